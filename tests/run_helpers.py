"""Shared pieces of the tests that run the DPO recipe end to end: a small recipe and the logged training rows."""

from __future__ import annotations

import json
from pathlib import Path

from llm_entreg.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DPO = ROOT / "recipes" / "dpo_entropy.yaml"


def dpo_recipe(tmp_path, *overrides):
    """The DPO recipe writing to ``tmp_path``, logging every step, no checkpoints, a small held-out evaluation."""
    return load_recipe(DPO, [f"output_dir={tmp_path}", "logging_steps=1", "save_strategy=no",
                             "evaluation.num_prompts=96", *overrides])


def training_rows(out: Path) -> list[dict]:
    """The training rows (those with a loss) of ``out/metrics.jsonl``."""
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
