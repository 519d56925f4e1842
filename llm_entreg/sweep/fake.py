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

from ..checkpoints import write_marker


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


#: Held-out prompts and samples per prompt of the fake evaluation.
FAKE_PROMPTS, FAKE_SAMPLES = 64, 16


def _held_out(seed: int, gain: float, strength: float, entropy: float, rng=None) -> dict:
    """A caricature of the held-out evaluation with per-prompt values: prompts of a seed share their difficulty
    across trials (pairing), a seed shifts every trial of it alike, and each trial draws its own outcomes from
    ``rng`` (without one: the fixed draws of the seed's starting policy)."""
    prompts = random.Random(f"fake-prompts:{seed}")
    shift = 0.06 * prompts.gauss(0, 1)
    noise = float(os.environ.get("LLM_ENTREG_FAKE_NOISE", "1.0") or 0.0)
    draw = rng or random.Random(f"fake-before:{seed}")
    reward, correct, nll = [], [], []
    for _ in range(FAKE_PROMPTS):
        p = min(max(0.44 + gain + shift + 0.3 * (prompts.random() - 0.5), 0.0), 1.0)
        reward.append(float(draw.random() < p) if noise else p)
        correct.append(sum(draw.random() < p for _ in range(FAKE_SAMPLES)))
        nll.append(0.42 - 0.05 * strength + 0.02 * (1 - strength) + 0.05 * noise * draw.gauss(0, 1))
    mean = sum(reward) / len(reward)
    return {"num_prompts": FAKE_PROMPTS, "reward": round(mean, 4), "accuracy": mean, "sampled_accuracy": sum(correct) / (FAKE_PROMPTS * FAKE_SAMPLES),
            "nll": sum(nll) / len(nll), "entropy": entropy, "num_samples": FAKE_SAMPLES,
            "per_prompt": {"reward": reward, "correct": correct, "nll": nll}}


def fake_run(recipe: dict, resume_from_checkpoint=None, log=print) -> dict:
    """Write ``metrics.jsonl`` and ``summary.json`` into ``trainer.output_dir`` like ``run`` does.

    The curves caricature the entropy trade-off: with a small β the entropy decays toward a floor (collapse),
    with a large β it stays where it started and the reward barely moves; the reward peaks at a middle β.
    ``resume_from_checkpoint`` continues the log after the checkpoint's step. A negative ``entropy_coef`` raises
    ``ValueError`` (as the real config does without ``allow_entropy_minimization``). ``LLM_ENTREG_FAKE_SLEEP``
    (seconds per trial) slows it down; ``LLM_ENTREG_FAKE_CRASH_ONCE=β[,β...]`` kills the process (``os._exit``)
    halfway through those trials the first time, after writing a complete ``checkpoint-<step>`` directory;
    ``LLM_ENTREG_FAKE_FAIL=β[,β...]`` makes those trials raise.
    ``LLM_ENTREG_FAKE_GAIN`` (default 0.12) is the held-out reward gain at the best β (negative: β hurts) and
    ``LLM_ENTREG_FAKE_NOISE`` (default 1; 0: no sampling noise) scales the per-prompt noise.
    """
    trainer = recipe["trainer"]
    out = Path(trainer["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    coef = float(trainer.get("entropy_coef", 0.0) or 0.0)
    if coef < 0 and not trainer.get("allow_entropy_minimization"):
        raise ValueError(f"entropy_coef: must be >= 0 unless allow_entropy_minimization=True, got {coef}")
    if coef in {float(c) for c in os.environ.get("LLM_ENTREG_FAKE_FAIL", "").split(",") if c.strip()}:
        raise RuntimeError(f"injected failure of the trial at entropy_coef={coef} (LLM_ENTREG_FAKE_FAIL)")
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
                write_marker(out / f"checkpoint-{step - 1}", step - 1)  # a complete checkpoint, then the crash
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
    peak = float(os.environ.get("LLM_ENTREG_FAKE_GAIN", "0.12") or 0.0)
    gain = peak * strength * (1 - strength) * 4  # peaks at a middle β
    seed = int(recipe.get("seed", 0))
    before = _held_out(seed, 0.0, 0.0, h0)
    after = _held_out(seed, gain, strength, h, rng=rng)
    summary = {"recipe": recipe.get("source"), "algorithm": recipe.get("algorithm"), "steps": total,
               "train_seconds": sleep, "entropy_coef": coef, "train": {}, "held_out_before": before,
               "held_out_after": after, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"fake trial: β={coef} reward {before['reward']} -> {after['reward']}")
    return summary
