"""A sweep trial can use 2 processes: `llm-entreg sweep ... --accelerate-config cpu_ddp_2proc`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_entreg.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_sweep_trials_run_on_two_processes(tmp_path):
    out = tmp_path / "sweep"
    code = main(["sweep", str(ROOT / "recipes" / "dpo_entropy.yaml"), "--entropy-coef", "0,0.1",
                 "--accelerate-config", "cpu_ddp_2proc", "--out", str(out), "--no-progress", "--no-plots", "--seeds", "0",
                 "max_steps=2", "logging_steps=1", "save_strategy=no", "evaluation.num_prompts=8"])
    assert code == 0
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert (trial / "launch.log").is_file() and (trial / "recipe.yaml").is_file()
        logged = [json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logged if "loss" in r]
        assert len(steps) == 2
        # 2 ranks x per_device_train_batch_size 8 pairs per step over the 2048-pair train split: 2 steps = 32/2048
        assert steps[-1]["epoch"] == pytest.approx(2 * 2 * 8 / 2048)
    best = json.loads((out / "best.json").read_text())
    assert set(best["pick"]["trial_ids"]) <= {t.name for t in trials}
