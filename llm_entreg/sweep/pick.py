"""Per-trial numbers, the two warning flags, and the best-β pick. Pure functions over logged records.

Validation reward: ``held_out_after["reward"]`` from the run's summary when the recipe has a held-out evaluation
(the embedded default: greedy-decoding reward on ``evaluation.num_prompts`` held-out prompts). Otherwise the
**last logged value** of the first of :data:`REWARD_KEYS` the trial logged (eval metrics first, then training
ones); ``reward_source`` in the results names which one was used. Validation NLL: ``held_out_after["nll"]``
(mean per-token NLL of the correct completions), or missing.

Flags (windows are fractions of the logged training steps that carry an entropy value, at least one step each):

- ``collapsed``: mean entropy over the last ``window`` (20%) < ``collapse_fraction`` (0.5) x mean entropy over
  the first ``window``;
- ``never_committed``: the last-window mean entropy is within ``± commit_band`` (10%) of the first-window mean
  AND the validation reward improved by less than ``commit_min_gain`` (0.01, in reward units) over the trial's
  starting reward (``held_out_before["reward"]``, or the first logged value of the reward key).

Either flag is ``None`` when there are too few logged points to tell (fewer than two entropy values, or no
reward before/after).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

REWARD_KEYS = ("eval_reward", "reward", "objective/rlhf_reward", "objective/scores", "eval_rewards/accuracies",
               "rewards/accuracies")
ENTROPY_KEYS = ("entropy", "objective/entropy")
COEF_KEYS = ("entropy_coef",)


@dataclass(frozen=True)
class Thresholds:
    """Flag thresholds (CLI: --collapse-fraction, --window, --commit-band, --commit-min-gain)."""

    collapse_fraction: float = 0.5
    window: float = 0.2
    commit_band: float = 0.1
    commit_min_gain: float = 0.01

    def __post_init__(self):
        for name, lo, hi in (("collapse_fraction", 0.0, None), ("window", 0.0, 0.5), ("commit_band", 0.0, None),
                             ("commit_min_gain", None, None)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            if lo is not None and value <= lo or hi is not None and value > hi:
                raise ValueError(f"{name}: must be in ({lo}, {hi if hi is not None else 'inf'}], got {value}")

    def as_dict(self) -> dict:
        return asdict(self)


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def series(history: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a logged key, skipping records without it or with a non-finite value."""
    steps, values = [], []
    for i, record in enumerate(history):
        value = _number(record.get(key))
        if value is not None:
            steps.append(int(record.get("step", i + 1)))
            values.append(value)
    return steps, values


def first_key(history: list[dict], keys: Iterable[str]) -> str | None:
    for key in keys:
        if series(history, key)[1]:
            return key
    return None


def window_means(values: list[float], window: float = 0.2) -> tuple[float | None, float | None]:
    """Means over the first and the last ``window`` fraction of ``values`` (at least one value each)."""
    if not values:
        return None, None
    k = max(1, math.ceil(window * len(values) - 1e-9))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def is_collapsed(entropy: list[float], thresholds: Thresholds = Thresholds()) -> bool | None:
    if len(entropy) < 2:
        return None
    first, last = window_means(entropy, thresholds.window)
    return bool(last < thresholds.collapse_fraction * first)


def is_never_committed(entropy: list[float], reward_before: float | None, reward_after: float | None,
                       thresholds: Thresholds = Thresholds()) -> bool | None:
    if len(entropy) < 2 or reward_before is None or reward_after is None:
        return None
    first, last = window_means(entropy, thresholds.window)
    flat = abs(last - first) <= thresholds.commit_band * abs(first)
    return bool(flat and (reward_after - reward_before) < thresholds.commit_min_gain)


def trial_metrics(summary: dict | None, history: list[dict], thresholds: Thresholds = Thresholds()) -> dict[str, Any]:
    """The numbers one results row needs, from a run's summary and its logged records."""
    summary = summary or {}
    before, after = summary.get("held_out_before") or {}, summary.get("held_out_after") or {}
    out: dict[str, Any] = {}
    if _number(after.get("reward")) is not None:
        out["val_reward"], out["reward_source"] = float(after["reward"]), "held_out_after.reward"
        reward_before = _number(before.get("reward"))
    else:
        key = first_key(history, REWARD_KEYS)
        values = series(history, key)[1] if key else []
        out["val_reward"] = values[-1] if values else None
        out["reward_source"] = f"last logged {key}" if key else None
        reward_before = values[0] if len(values) > 1 else None
    out["reward_before"] = reward_before
    out["val_nll"] = _number(after.get("nll"))
    for key in ("accuracy", "sampled_accuracy", "entropy", "ref_entropy"):
        if _number(after.get(key)) is not None:
            out[f"val_{key}"] = float(after[key])
    ent_key = first_key(history, ENTROPY_KEYS)
    entropy = series(history, ent_key)[1] if ent_key else []
    first, last = window_means(entropy, thresholds.window)
    out["entropy_first"] = first
    out["entropy_last"] = last
    out["entropy_ratio"] = (last / first) if first else None
    out["collapsed"] = is_collapsed(entropy, thresholds)
    out["never_committed"] = is_never_committed(entropy, reward_before, out["val_reward"], thresholds)
    coef = series(history, COEF_KEYS[0])[1]
    out["coef_last"] = coef[-1] if coef else None
    out["steps"] = summary.get("steps")
    return out


RULE = (
    "Pick the configuration (β, schedule) with the highest validation reward, averaged over its seeds (failed "
    "trials are left out). Configurations whose mean reward is within {tol:g} of the best count as tied; a tie "
    "goes to the lowest mean validation NLL (a configuration without NLL ranks last), then to the smaller β, "
    "then to the schedule name in alphabetical order. Validation reward: held_out_after['reward'] where the "
    "recipe has a held-out evaluation, else the last logged reward-like metric (reward_source). Flags are "
    "reported, not used by the pick."
)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pick_best(rows: list[dict], tolerance: float = 0.0) -> dict[str, Any] | None:
    """The best configuration by :data:`RULE`; ``None`` when no trial has a validation reward.

    ``rows`` need ``entropy_coef``, ``schedule``, ``seed``, ``id``, ``status`` and ``val_reward``; ``val_nll``,
    ``collapsed`` and ``never_committed`` are used when present.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "complete" and _number(row.get("val_reward")) is not None:
            groups[(float(row["entropy_coef"]), str(row["schedule"]))].append(row)
    if not groups:
        return None
    configs = []
    for (coef, schedule), members in groups.items():
        nlls = [_number(r.get("val_nll")) for r in members]
        configs.append({
            "entropy_coef": coef,
            "schedule": schedule,
            "val_reward": _mean([float(r["val_reward"]) for r in members]),
            "val_nll": _mean([v for v in nlls if v is not None]) if all(v is not None for v in nlls) else None,
            "seeds": sorted(int(r["seed"]) for r in members),
            "trial_ids": [r["id"] for r in sorted(members, key=lambda r: int(r["seed"]))],
            "collapsed": [r.get("collapsed") for r in members],
            "never_committed": [r.get("never_committed") for r in members],
        })
    best_reward = max(c["val_reward"] for c in configs)
    tied = [c for c in configs if c["val_reward"] >= best_reward - tolerance - 1e-12]

    def key(c):
        return (c["val_nll"] if c["val_nll"] is not None else math.inf, c["entropy_coef"], c["schedule"])

    tied.sort(key=key)
    best = dict(tied[0])
    if len(tied) == 1:
        reason = f"highest mean validation reward ({best['val_reward']:.4g})"
    else:
        reason = (f"{len(tied)} configurations within {tolerance:g} of the best reward {best_reward:.4g}; "
                  f"lowest validation NLL ({best['val_nll']:.4g})" if best["val_nll"] is not None else
                  f"{len(tied)} configurations tied; none has an NLL, smallest β")
    ranking = sorted(configs, key=lambda c: (-c["val_reward"], *key(c)))
    return {
        **best,
        "rule": RULE.format(tol=tolerance),
        "tolerance": tolerance,
        "reason": reason,
        "tied_with": [{"entropy_coef": c["entropy_coef"], "schedule": c["schedule"], "val_reward": c["val_reward"],
                       "val_nll": c["val_nll"]} for c in tied[1:]],
        "ranking": [{"entropy_coef": c["entropy_coef"], "schedule": c["schedule"], "val_reward": c["val_reward"],
                     "val_nll": c["val_nll"], "n_seeds": len(c["seeds"])} for c in ranking],
    }


def fit_exp_entropy(entropy: Iterable[float], reward: Iterable[float]) -> dict[str, float] | None:
    """Least-squares fit of ``R = -a * exp(H) + b`` (linear in ``a`` and ``b`` given ``exp(H)``).

    Returns ``{"a", "b", "r2", "n"}``, or ``None`` with fewer than two distinct entropies. Uses numpy only.
    """
    import numpy as np

    pairs = [(h, r) for h, r in zip(entropy, reward) if _number(h) is not None and _number(r) is not None]
    if len({h for h, _ in pairs}) < 2:
        return None
    h = np.array([p[0] for p in pairs], dtype=float)
    r = np.array([p[1] for p in pairs], dtype=float)
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([a, b])
    total = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else float("nan")
    return {"a": float(a), "b": float(b), "r2": r2, "n": len(pairs)}
