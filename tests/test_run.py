"""A run end to end (``run.py``): the DPO main job on the embedded default keeps entropy higher with the bonus and
writes its record (metrics.jsonl, curves.png, summary.json); bad data and model inputs name the field and file; the
run's life: SIGTERM then resume equals the uninterrupted run, a kill mid-save falls back to the previous checkpoint,
a used output_dir is refused, damaged checkpoint files are named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llm_entreg.checkpoints import COMPLETE_MARKER, write_marker
from llm_entreg.cli import main
from llm_entreg.recipes import load_recipe
from llm_entreg.run import Preempted, RunError, build, curve_summary, format_summary, run
from llm_entreg.trainers.mixin import STATE_FILE

from .run_helpers import DPO, ROOT, dpo_recipe, training_rows



@pytest.mark.slow
def test_bonus_keeps_held_out_entropy_higher_and_run_writes_its_record(tmp_path):
    base = ["max_steps=24", "learning_rate=3e-4", "per_device_train_batch_size=16"]
    # beta = 2: at 0.5 the held-out entropy gain (+0.00 to +0.05 nats over 24 steps) is within the run-to-run
    # spread across CPUs (float trajectories differ between machines); at 2 it was +0.10 on the machine where 0.5
    # gave -0.01 (2026-11-29), and 1.0 gave +0.045.
    plain = run(dpo_recipe(tmp_path / "b0", *base, "entropy_coef=0"), log=lambda *a: None)
    bonus = run(dpo_recipe(tmp_path / "b1", *base, "entropy_coef=2.0"), log=lambda *a: None)
    # Same seed, data order and starting point: only the bonus differs
    assert plain["held_out_before"] == bonus["held_out_before"]
    h0, h1 = plain["held_out_after"]["ref_entropy"], bonus["held_out_after"]["ref_entropy"]
    assert h1 > h0 + 0.02, (h0, h1)
    # ... and so does the logged training entropy, averaged over the second half of the run
    second_half = [sum(r["entropy"] for r in training_rows(tmp_path / b)[12:]) / 12 for b in ("b0", "b1")]
    assert second_half[1] > second_half[0], second_half
    # Plain DPO learns the preferences: reward accuracy on the training pairs goes up
    assert plain["train"]["rewards/accuracies"]["last"] > plain["train"]["rewards/accuracies"]["first"]
    out = tmp_path / "b1"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert len(logged) == 24 and all(r["entropy_coef"] == 2.0 for r in logged)
    assert {"entropy", "entropy/chosen", "entropy/rejected", "entropy_bonus"} <= logged[0].keys()
    assert (out / "curves.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["steps"] == 24


def test_missing_columns_and_missing_model_path_are_clear(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    recipe = load_recipe(DPO, [f"output_dir={tmp_path / 'out'}", f"data.train={data}"])
    with pytest.raises(ValueError, match=r"data.train \('.*pairs.jsonl'\): missing column\(s\) \['rejected'\]"):
        build(recipe, log=lambda *a: None)
    recipe = load_recipe(DPO, [f"output_dir={tmp_path / 'out'}", "model.name_or_path=/nonexistent/model"])
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: '/nonexistent/model' does not exist"):
        build(recipe, log=lambda *a: None)
    assert main(["train", str(DPO), "model.name_or_path=/nonexistent/model", f"output_dir={tmp_path}"]) == 1


@pytest.mark.slow
def test_the_exploration_recipe_commits_without_an_entropy_term(tmp_path):
    """A short run of recipes/explore_grpo.yaml at β = 0: the policy commits (held-out entropy and distinct correct
    answers fall, pass@1 rises) and the run reports pass@k, distinct answers, the KL to its start and the curves."""
    recipe = load_recipe("explore_grpo", [f"output_dir={tmp_path}", "entropy_coef=0", "max_steps=80",
                                          "evaluation.num_prompts=64", "evaluation.num_samples=16",
                                          "evaluation.curve_every=40", "evaluation.curve_prompts=16"])
    summary = run(recipe, log=lambda *a: None)
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert set(after["pass_at_k"]) == {"1", "4", "16"} and after["num_samples"] == 16
    assert after["entropy"] < 0.8 * before["entropy"]
    assert after["distinct_correct"] < before["distinct_correct"]
    assert after["pass_at_k"]["1"] > before["pass_at_k"]["1"] + 0.05
    assert after["kl_to_reference"] > 0.05 and "kl_to_reference" not in before
    curve = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "held_out/pass@16" in r]
    assert [r["step"] for r in curve] == [40, 80]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["held_out_after"]["per_prompt"]["correct"] == after["per_prompt"]["correct"]


# ------------------------------------------------------------------------------------------- the run's life
#: A short DPO run with a moving coefficient (so its trajectory is part of what resume must restore).
LIFE = ["max_steps=4", "save_strategy=steps", "save_steps=2", "save_total_limit=3", "evaluation.held_out=false",
        "entropy_schedule=linear", "entropy_coef=0.1"]
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with complete checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(dpo_recipe(out, *LIFE), **QUIET)
    return out


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in training_rows(out)]


class _SignalAt(TrainerCallback):
    """Sends this process a SIGTERM at the end of optimizer step ``step``, as a scheduler would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path):
    steps = ["max_steps=6", "save_strategy=no", "evaluation.held_out=false", "entropy_schedule=linear",
             "entropy_coef=0.1"]
    full = run(dpo_recipe(tmp_path / "full", *steps), **QUIET)
    with pytest.raises(Preempted) as stopped:
        run(dpo_recipe(tmp_path / "cut", *steps), callbacks=[_SignalAt(2)], **QUIET)
    # the signal came during step 2's callbacks: the run stopped at the next step boundary, with a checkpoint
    assert stopped.value.step == 3 and (tmp_path / "cut" / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "cut" / "final").exists() and _steps(tmp_path / "cut") == [1, 2, 3]
    resumed = run(dpo_recipe(tmp_path / "cut", *steps), resume_from_checkpoint=True, **QUIET)
    assert resumed["steps"] == full["steps"] == 6 and resumed["resumed_from"].endswith("checkpoint-3")
    assert training_rows(tmp_path / "cut") == training_rows(tmp_path / "full")  # every logged value, coefficient included
    coefs = [r["entropy_coef"] for r in training_rows(tmp_path / "full")]
    assert len(set(coefs)) == 6  # a moving coefficient: its trajectory was restored, not restarted
    weights = [load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("full", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


_KILLER = """
import os, signal, sys, torch
from llm_entreg.recipes import load_recipe
from llm_entreg.run import run
save = torch.save
def dying_save(obj, f, *args, **kwargs):
    if str(f).endswith(os.path.join("checkpoint-4", "{state}.tmp")):  # mid-save: TRL's files written, ours not
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
torch.save = dying_save
run(load_recipe(sys.argv[1], sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_kill_9_mid_save_falls_back_to_the_previous_checkpoint_without_duplicate_steps(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER.replace("{state}", STATE_FILE))
    args = [f"output_dir={out}", "logging_steps=1", *LIFE, "max_steps=6"]
    proc = subprocess.run([sys.executable, str(script), str(DPO), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert _steps(out) == [1, 2, 3, 4]
    said = []
    summary = run(load_recipe(DPO, args), resume_from_checkpoint=True, log=said.append)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 6
    assert any("skipping" in line and "checkpoint-4" in line for line in said), said
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the killed run were dropped, then logged again
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()  # rewritten, complete this time


@pytest.mark.slow
def test_a_second_run_into_a_used_output_dir_is_refused_and_loses_nothing(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=r"already holds a run \(metrics.jsonl, .*final, checkpoint-2, \.\.\.\); "
                                       r"continue it with --resume, replace it with overwrite_output_dir=true"):
        run(dpo_recipe(out, *LIFE), **QUIET)
    assert main(["train", str(DPO), f"output_dir={out}", "logging_steps=1", "save_strategy=no", *LIFE]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("kept")
    said = []
    run(dpo_recipe(out, *LIFE, "max_steps=2", "overwrite_output_dir=true"), log=said.append)
    assert any("removed the earlier run" in line for line in said)
    assert _steps(out) == [1, 2] and not (out / "checkpoint-4").exists() and (out / "notes.txt").read_text() == "kept"


@pytest.mark.slow
def test_trls_resume_field_continues_the_run_and_changed_settings_are_named(finished, tmp_path):
    out = _copy(finished, tmp_path)
    said = []
    summary = run(dpo_recipe(out, *LIFE, "max_steps=6", f"resume_from_checkpoint={out / 'checkpoint-2'}",
                          "learning_rate=5e-5"), log=said.append)
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["steps"] == 6
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # appended after step 2, nothing twice
    text = "\n".join(said)
    assert "trainer.learning_rate: 0.0001 -> 5e-05" in text and "trainer.max_steps: 4 -> 6" in text
    assert (out / "recipe.resolved.until-step-2.yaml").is_file()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
@pytest.mark.slow
def test_a_truncated_checkpoint_file_is_named_with_what_to_do(finished, tmp_path, capsys, name):
    out = _copy(finished, tmp_path)
    path = out / "checkpoint-4" / name
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["train", str(DPO), f"output_dir={out}", *LIFE, "max_steps=6", "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint-4/{name}: 1000 bytes" in err and "delete this checkpoint to resume from the one before" in err


@pytest.mark.slow
def test_a_coefficient_state_carrying_a_pickled_payload_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    witness = tmp_path / "payload_ran"
    state = torch.load(out / "checkpoint-4" / STATE_FILE, weights_only=True)
    torch.save({**state, "note": _Payload(witness)}, out / "checkpoint-4" / STATE_FILE)
    write_marker(out / "checkpoint-4", 4)  # a consistent, complete checkpoint: only the content is wrong
    with pytest.raises(ValueError, match=STATE_FILE + ": refused: the entropy-coefficient state holds more"):
        run(dpo_recipe(out, *LIFE, "max_steps=6"), resume_from_checkpoint=True, **QUIET)
    assert not witness.exists()


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_chosen_rejected_only_dataset_trains_with_the_prompt_inside(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"chosen": f"1+{i}={i + 1}", "rejected": f"1+{i}={i + 2}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(DPO, [f"output_dir={tmp_path / 'out'}", f"data.train={data}", "max_steps=1",
                               "evaluation.held_out=false", "save_strategy=no"])
    summary = run(recipe, **QUIET)
    assert summary["steps"] == 1


def test_the_summary_reports_window_means_not_single_points():
    history = [{"step": s, "loss": float(s), "rewards/margins": 0.0} for s in range(1, 11)]
    history[4]["rewards/margins"] = 5.0  # a peak mid-run
    history[-1]["rewards/margins"] = -1.0  # one noisy last point
    summary = curve_summary(history)
    assert summary["loss"] == {"first": 1.5, "last": 9.5, "n_window": 2, "n_logged": 10}
    assert summary["rewards/margins"]["last"] == -0.5
    text = format_summary({"steps": 10, "train_seconds": 1.0, "output_dir": "x", "train": summary})
    assert "mean of the first -> last 2 logged step(s)" in text and "loss: 1.5 -> 9.5" in text


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    run(dpo_recipe(tmp_path, "max_steps=2", "evaluation.held_out=false", "report_to=tensorboard"), **QUIET)
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
