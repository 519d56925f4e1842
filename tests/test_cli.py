"""The command line (``cli.py``): exit codes and messages for bad recipes and configs, and the accelerate relaunch."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from llm_entreg import launch
from llm_entreg.cli import main

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


def test_train_with_an_accelerate_config_relaunches_and_forwards_the_rest(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "dpo_entropy", "max_steps=2", "--accelerate-config=cpu_ddp_2proc", "seed=3"]) == 0
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert Path(cmd[4]).name == "cpu_ddp_2proc.yaml"
    assert cmd[5:] == ["-m", "llm_entreg", "train", "dpo_entropy", "max_steps=2", "seed=3"]


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["trian"]) == 2
