"""The command line (``cli.py``): exit codes and messages for bad recipes, typed fields and configs; TRL's flag
habits; --resume as a flag; fields, --version and unknown commands; the accelerate relaunch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import llm_entreg.run as run_module
from llm_entreg.cli import main, split_train_argv

ROOT = Path(__file__).resolve().parents[1]
DPO = ROOT / "recipes" / "dpo_entropy.yaml"


def test_a_bad_recipe_exits_2_naming_the_key(tmp_path, capsys):
    raw = yaml.safe_load(DPO.read_text())
    raw["trainer"]["learnin_rate"] = 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["train", str(bad)]) == 2
    assert "trainer.learnin_rate" in capsys.readouterr().err


def test_an_unknown_accelerate_config_exits_2_listing_the_known_ones(capsys):
    assert main(["train", "dpo_entropy", "--accelerate-config", "nope"]) == 2
    assert "known names" in capsys.readouterr().err


def test_train_with_an_accelerate_config_relaunches_and_forwards_the_rest(launched_commands):
    calls = launched_commands
    assert main(["train", "dpo_entropy", "max_steps=2", "--accelerate-config=cpu_ddp_2proc", "seed=3"]) == 0
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert Path(cmd[4]).name == "cpu_ddp_2proc.yaml"
    assert cmd[5:] == ["-m", "llm_entreg", "train", "dpo_entropy", "max_steps=2", "seed=3"]


def test_usage_version_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "fields" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command 'trian'; did you mean 'train'?" in capsys.readouterr().err
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llm-entreg 0.1.0 (trl ") and "transformers" in out


@pytest.mark.parametrize(("override", "message", "code"), [
    ("entropy_coef=abc", "trainer.entropy_coef: expected a float, got 'abc'", 2),
    ("max_steps=abc", "trainer.max_steps: expected an integer, got 'abc'", 2),
    ("learning_rate=fast", "trainer.learning_rate: expected a float, got 'fast'", 2),
    ("bf16=maybe", "trainer.bf16: expected true or false or null, got 'maybe'", 2),
    ("lr_scheduler_type=cosinus", "trainer.lr_scheduler_type: expected one of ('linear', 'cosine'", 2),
    ("entropy_coef=-0.05", "trainer: entropy_coef: got -0.05 < 0, which minimises entropy", 2),
    ("deepspeed=/nonexistent/ds.json", "trainer.deepspeed: '/nonexistent/ds.json' is not a file", 2),
    ("resume_from_checkpoint=/nonexistent/checkpoint-3", "resume_from_checkpoint: /nonexistent/checkpoint-3 is "
                                                         "not a directory", 1),
])
def test_every_field_type_is_checked_before_any_model_loads(tmp_path, capsys, monkeypatch, override, message, code):
    monkeypatch.setattr(run_module, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert main(["train", "dpo_entropy", f"output_dir={out}", override]) == code
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def captured(monkeypatch):
    """``run`` replaced by a recorder: what the CLI would train, without training."""
    calls = []

    def fake_run(recipe, resume_from_checkpoint=None, **kwargs):
        calls.append((recipe, resume_from_checkpoint))
        return {"steps": 0, "train_seconds": 0.0, "output_dir": recipe["trainer"]["output_dir"], "train": {}}

    monkeypatch.setattr(run_module, "run", fake_run)
    return calls


def test_trl_style_config_and_flags_are_recipe_overrides(tmp_path, captured):
    argv = ["train", "--config", str(DPO), "--learning_rate", "1e-5", "--max-steps=3", "--bf16", "false",
            "--gradient_checkpointing", f"--output_dir={tmp_path}", "seed=4", "--entropy_coef", "-0.0",
            "--evaluation.num_prompts", "10"]
    assert main(argv) == 0
    ((recipe, resume),) = captured
    trainer = recipe["trainer"]
    assert trainer["learning_rate"] == 1e-5 and trainer["max_steps"] == 3 and trainer["bf16"] is False
    assert trainer["gradient_checkpointing"] is True and trainer["output_dir"] == str(tmp_path)
    assert recipe["seed"] == 4 and recipe["evaluation"]["num_prompts"] == 10 and resume is None


def test_resume_is_a_flag_and_takes_a_path_only_after_an_equals_sign(tmp_path, captured):
    assert split_train_argv(["dpo_entropy", "--resume", "output_dir=X"]) == (["dpo_entropy"], ["output_dir=X"], True)
    assert split_train_argv(["--resume=runs/a/checkpoint-4", "dpo_entropy"]) == (
        ["dpo_entropy"], [], "runs/a/checkpoint-4")
    # a path with "=" in it (a sweep trial's directory) is the recipe, not an override
    # and a bare flag before a key=value is true
    assert split_train_argv(["/sweep/trials/coef=0_seed=1/recipe.yaml", "--gradient_checkpointing", "seed=2"]) == (
        ["/sweep/trials/coef=0_seed=1/recipe.yaml"], ["gradient_checkpointing=true", "seed=2"], None)
    assert main(["train", "dpo_entropy", "--resume", f"output_dir={tmp_path}"]) == 0
    ((recipe, resume),) = captured
    assert resume is True and recipe["trainer"]["output_dir"] == str(tmp_path)


def test_a_recipe_is_required_once(capsys):
    assert main(["train"]) == 2
    assert "a recipe is required" in capsys.readouterr().err
    assert main(["train", "dpo_entropy", "--config", "dpo_entropy"]) == 2
    assert "give the recipe once" in capsys.readouterr().err


def test_train_help_lists_sections_configs_and_the_fields_command(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for word in ("recipe sections: algorithm", "trainer", "llm-entreg fields ALGORITHM", "cpu_ddp_2proc", "zero3",
                 "dpo_entropy", "--resume", "overwrite_output_dir"):
        assert word in out, word


def test_fields_lists_every_key_with_type_default_and_help(capsys):
    assert main(["fields", "dpo", "entropy_coef"]) == 0
    out = capsys.readouterr().out
    assert "trainer.entropy_coef: a float = 0.0" in out and "β" in out and "entropy_coef_end" in out
    assert main(["fields", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "evaluation.num_samples = 16" in out and "trainer.learning_rate: a float" in out
    assert main(["fields", "nope"]) == 2


@pytest.mark.slow
def test_accelerate_launch_with_processes_but_no_config_on_a_cpu_stops_and_says_how(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "llm_entreg", "train",
           "dpo_entropy", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "asked for several processes but started one" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("world_size", "finalized"), [("2", False), ("1", True)])
def test_exit_process_skips_finalization_only_on_a_rank_of_a_multi_process_run(world_size, finalized):
    """A rank ends with its code and its buffered output flushed, but without interpreter finalization (no atexit
    handler runs); a single process exits normally."""
    code = ("import atexit, sys\n"
            "from llm_entreg.cli import exit_process\n"
            "atexit.register(lambda: print('finalized'))\n"
            "sys.stdout.write('buffered line\\n')\n"
            "exit_process(7)\n")
    # block-buffered stdout (as under a launcher that does not set PYTHONUNBUFFERED), so the flush is what is tested
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines()[0] == "buffered line"  # the pipe's block buffer was flushed before the exit
    assert ("finalized" in proc.stdout) is finalized
