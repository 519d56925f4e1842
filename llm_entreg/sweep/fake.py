"""A synthetic trial function with :func:`llm_entreg.run.run`'s signature: no model, milliseconds per trial.
``llm-entreg sweep ... --dry-run`` uses it to check the sweep machinery (grid, workers, storage, resume, reports)
before spending compute; the tests use it too. See docs/sweep.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path


def _coef_at(trainer: dict, step: int, total: int) -> float:
    start, end = float(trainer.get("entropy_coef", 0.0) or 0.0), float(trainer.get("entropy_coef_end", 0.0) or 0.0)
    p = min(step / max(total, 1), 1.0)
    schedule = trainer.get("entropy_schedule")
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "exponential":
        return start * (end / start) ** p if start and end else start
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))
    if trainer.get("entropy_controller"):
        return start * (1 + 0.5 * math.sin(step / 3))
    return start


def fake_run(recipe: dict, resume_from_checkpoint=None, log=print) -> dict:
    """Write ``metrics.jsonl`` and ``summary.json`` into ``trainer.output_dir`` like ``run`` does.

    The curves caricature the entropy trade-off: with a small β the entropy decays toward a floor (collapse),
    with a large β it stays where it started and the reward barely moves; the reward peaks at a middle β.
    ``resume_from_checkpoint`` continues the log after the checkpoint's step. A negative ``entropy_coef`` raises
    ``ValueError`` (as the real config does without ``allow_entropy_minimization``). ``LLM_ENTREG_FAKE_SLEEP``
    (seconds per trial) slows it down; ``LLM_ENTREG_FAKE_CRASH_ONCE=β[,β...]`` kills the process (``os._exit``)
    halfway through those trials the first time, after writing a ``checkpoint-<step>`` directory.
    """
    trainer = recipe["trainer"]
    out = Path(trainer["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    coef = float(trainer.get("entropy_coef", 0.0) or 0.0)
    if coef < 0 and not trainer.get("allow_entropy_minimization"):
        raise ValueError(f"entropy_coef: must be >= 0 unless allow_entropy_minimization=True, got {coef}")
    total = int(trainer.get("max_steps", 20) or 20)
    every = int(trainer.get("logging_steps", 1) or 1)
    rng = random.Random(int(recipe.get("seed", 0)) * 7919 + round(coef * 1e6))
    first = 1
    metrics = out / "metrics.jsonl"
    if resume_from_checkpoint:
        first = int(str(resume_from_checkpoint).rstrip("/").rsplit("-", 1)[-1]) + 1
    elif metrics.exists():
        metrics.unlink()
    h0, floor = 0.45, 0.08
    strength = coef / (coef + 0.01)  # 0 = no bonus, -> 1 for a large β
    sleep = float(os.environ.get("LLM_ENTREG_FAKE_SLEEP", "0") or 0)
    crash = {float(c) for c in os.environ.get("LLM_ENTREG_FAKE_CRASH_ONCE", "").split(",") if c.strip()}
    crash_at = total // 2 if coef in crash and not (out / ".crashed").exists() else None
    with metrics.open("a") as f:
        for step in range(first, total + 1):
            if step == crash_at:
                (out / f"checkpoint-{step - 1}").mkdir(exist_ok=True)
                (out / ".crashed").touch()
                f.flush()
                os._exit(3)
            beta_t = _coef_at(trainer, step - 1, total)
            s_t = beta_t / (beta_t + 0.01)
            h = floor + (h0 - floor) * math.exp(-3.0 * (1 - s_t) * step / total) + 0.005 * rng.gauss(0, 1)
            if step % every == 0 or step == total:
                f.write(json.dumps({"step": step, "loss": 0.7 - 0.1 * step / total, "entropy": h,
                                    "entropy_coef": beta_t, "rewards/accuracies": 0.5 + 0.2 * step / total}) + "\n")
            if sleep:
                time.sleep(sleep / total)
    gain = 0.12 * strength * (1 - strength) * 4  # peaks at a middle β
    before = {"reward": 0.44, "accuracy": 0.44, "nll": 0.42, "entropy": h0}
    after = {"reward": round(0.44 + gain + 0.002 * rng.gauss(0, 1), 4), "accuracy": 0.44 + gain,
             "nll": 0.42 - 0.05 * strength + 0.02 * (1 - strength), "entropy": h}
    summary = {"recipe": recipe.get("source"), "algorithm": recipe.get("algorithm"), "steps": total,
               "train_seconds": sleep, "entropy_coef": coef, "train": {}, "held_out_before": before,
               "held_out_after": after, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"fake trial: β={coef} reward {before['reward']} -> {after['reward']}")
    return summary
