"""A 2-trial micro-sweep end to end on the real embedded DPO recipe, through the CLI."""

from __future__ import annotations

import json

import pytest

from llm_entreg.cli import main
from llm_entreg.sweep.store import read_results_csv

from .conftest import DPO

pytestmark = pytest.mark.slow


def test_micro_sweep_on_the_embedded_dpo_recipe(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(DPO), "--entropy-coef", "0,0.5", "--seeds", "0", "--out", str(out), "--threads", "1", "max_steps=4",
            "evaluation.num_prompts=16", "logging_steps=1", "save_steps=2", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2/2 trial(s) complete, 0 failed" in printed and "pick (reward): β =" in printed and "[95% " in printed
    rows = read_results_csv(out / "results.csv")
    assert [r["id"] for r in rows] == ["coef=0_sched=constant_seed=0", "coef=5e-1_sched=constant_seed=0"]
    for row in rows:
        assert row["status"] == "complete" and row["reward_source"] == "held_out_after.reward"
        assert 0.0 <= float(row["val_reward"]) <= 1.0 and float(row["val_nll"]) > 0 and row["steps"] == "4"
        trial = out / row["output_dir"]
        assert len((trial / "metrics.jsonl").read_text().splitlines()) >= 4  # the full curve stays with the trial
        assert (trial / "summary.json").is_file() and not list(trial.glob("checkpoint-*"))
    best = json.loads((out / "best.json").read_text())
    assert best["pick"]["entropy_coef"] in (0.0, 0.5) and best["rule"].startswith("Each configuration")
    assert isinstance(best["significant"], bool) and len(best["baseline"]["ci95"]) == 2
    for name in ("metric_vs_beta", "entropy_curves", "coef_trajectories"):
        assert (out / f"{name}.png").stat().st_size > 5_000
    assert main(argv) == 0  # the same command again: both trials reused
    assert "(reused)" not in capsys.readouterr().out  # --no-progress prints no per-trial lines ...
    assert all(json.loads((out / r["output_dir"] / "trial.json").read_text())["status"] == "complete" for r in rows)
