"""Per-trial numbers, the two warning flags, and the pick of β against the β = 0 baseline. Pure functions over
logged records and summaries; the intervals come from :mod:`.stats`.

The metric a sweep picks on (``--pick-metric``): ``reward`` (validation reward, the default), ``pass@K`` or ``nll``,
each from the per-prompt values of the held-out evaluation when the recipe has one. The flags and the rule, with
their thresholds: docs/sweep.md ("Flags", "The pick").
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..utils import pass_at_k, window_means
from .stats import BOOTSTRAP_SAMPLES, Interval, bootstrap_interval, paired_difference

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


def is_collapsed(entropy: list[float], thresholds: Thresholds = Thresholds()) -> bool | None:
    if len(entropy) < 2:
        return None
    first, last = window_means(entropy, thresholds.window)
    return bool(last < thresholds.collapse_fraction * first)


def is_never_committed(entropy: list[float], reward_before: float | None, reward_after: float | None,
                       thresholds: Thresholds = Thresholds()) -> bool | None:
    """The entropy did not fall (it stayed within ``commit_band`` of its start, or rose: on a tiny model a large β
    can run away to the uniform distribution, the same failure in its extreme form) and the reward gained less than
    ``commit_min_gain``."""
    if len(entropy) < 2 or reward_before is None or reward_after is None:
        return None
    first, last = window_means(entropy, thresholds.window)
    did_not_fall = last >= first - thresholds.commit_band * abs(first)
    return bool(did_not_fall and (reward_after - reward_before) < thresholds.commit_min_gain)


def held_out_flags(before: dict, after: dict, thresholds: Thresholds = Thresholds()) -> dict[str, bool | None]:
    """The two flags judged on the held-out samples: entropy before vs after training, and the reward gained
    (pass@1 of the samples where measured, else the greedy reward)."""
    h0, h1 = _number(before.get("entropy")), _number(after.get("entropy"))
    if h0 is None or h1 is None:
        return {"collapsed_held_out": None, "never_committed_held_out": None}
    key = "sampled_accuracy" if _number(after.get("sampled_accuracy")) is not None else "reward"
    r0, r1 = _number(before.get(key)), _number(after.get(key))
    return {"collapsed_held_out": bool(h1 < thresholds.collapse_fraction * h0),
            "never_committed_held_out": is_never_committed([h0, h1], r0, r1, thresholds)}


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
    for key in ("accuracy", "sampled_accuracy", "entropy", "ref_entropy", "distinct_correct"):
        if _number(after.get(key)) is not None:
            out[f"val_{key}"] = float(after[key])
    for k, value in (after.get("pass_at_k") or {}).items():
        out[f"val_pass@{k}"] = _number(value)
    out["val_entropy_before"] = _number(before.get("entropy"))
    out.update(held_out_flags(before, after, thresholds))
    if after.get("per_prompt"):
        out["per_prompt"] = {**after["per_prompt"], "num_samples": int(after.get("num_samples") or 0)}
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
    "Each configuration (β, schedule) is scored by its {metric} ({direction}), the mean over its seeds of the mean "
    "over held-out prompts, with a 95% interval from a bootstrap that resamples seeds and, within each seed, the "
    "prompts ({samples} resamples). Each configuration is compared with β = 0 on the same seeds and prompts (a paired "
    "difference with its own interval). The pick is the best configuration whose paired difference lies beyond its "
    "interval (the interval excludes 0 on the better side); configurations within {tol:g} of it count as tied and a "
    "tie goes to the lowest validation NLL, then the smaller β. When no configuration beats β = 0 beyond noise, the "
    "pick is β = 0. Without a β = 0 run there is no test: the best mean is reported as such. Flags are reported, not "
    "used."
)


def parse_metric(metric: str) -> tuple[str, bool]:
    """``(metric, maximize)`` for ``reward``, ``nll`` or ``pass@K``; a ``ValueError`` naming the choices otherwise."""
    if metric in ("reward", "nll"):
        return metric, metric == "reward"
    if metric.startswith("pass@") and metric[5:].isdigit() and int(metric[5:]) >= 1:
        return metric, True
    raise ValueError(f"--pick-metric: expected reward, nll or pass@K (e.g. pass@16), got {metric!r}")


def per_prompt_values(row: dict, metric: str) -> list[float] | None:
    """The trial's held-out per-prompt values of ``metric``; a one-value list from its summary number when the run
    had no per-prompt evaluation (then only the seeds are resampled); None when it has neither."""
    per_prompt = row.get("per_prompt") or {}
    if metric.startswith("pass@"):
        k, n = int(metric[5:]), int(per_prompt.get("num_samples") or 0)
        if per_prompt.get("correct") and 1 <= k <= n:
            return [pass_at_k(n, int(c), k) for c in per_prompt["correct"]]
        value = _number(row.get(f"val_{metric}"))
    else:
        if per_prompt.get(metric):
            return [float(v) for v in per_prompt[metric]]
        value = _number(row.get("val_reward" if metric == "reward" else "val_nll"))
    return None if value is None else [value]


def _configs(rows: list[dict], metric: str) -> dict[tuple, dict]:
    groups: dict[tuple, dict] = {}
    for row in rows:
        values = per_prompt_values(row, metric) if row.get("status") == "complete" else None
        if values is None:
            continue
        key = (float(row["entropy_coef"]), str(row["schedule"]))
        group = groups.setdefault(key, {"values": {}, "rows": []})
        group["values"][int(row["seed"])] = values
        group["rows"].append(row)
    return groups


def _summary(key: tuple, group: dict, interval: Interval, diff: Interval | None, maximize: bool) -> dict:
    rows = sorted(group["rows"], key=lambda r: int(r["seed"]))
    nlls = [_number(r.get("val_nll")) for r in rows]
    return {
        "entropy_coef": key[0], "schedule": key[1], "mean": interval.mean, "ci95": [interval.lo, interval.hi],
        "paired_diff": None if diff is None else diff.as_dict(),
        "significant": None if diff is None else diff.excludes_zero(maximize),
        "val_nll": sum(nlls) / len(nlls) if nlls and all(v is not None for v in nlls) else None,
        "seeds": [int(r["seed"]) for r in rows], "trial_ids": [r["id"] for r in rows],
        "collapsed": [r.get("collapsed") for r in rows], "never_committed": [r.get("never_committed") for r in rows],
    }


def score_configs(rows: list[dict], metric: str = "reward") -> tuple[list[dict], dict | None]:
    """Every configuration's mean, interval and paired difference from β = 0 (a list), and the baseline's summary."""
    metric, maximize = parse_metric(metric)
    groups = _configs(rows, metric)
    base_key = next((k for k in groups if k[0] == 0.0), None)
    baseline = groups[base_key]["values"] if base_key is not None else None
    scored = []
    for key, group in groups.items():
        diff = paired_difference(group["values"], baseline) if baseline is not None and key != base_key else None
        scored.append(_summary(key, group, bootstrap_interval(group["values"]), diff, maximize))
    base = next((c for c in scored if base_key is not None and (c["entropy_coef"], c["schedule"]) == base_key), None)
    return scored, base


def pick_best(rows: list[dict], tolerance: float = 0.0, metric: str = "reward",
              scored: tuple[list[dict], dict | None] | None = None) -> dict[str, Any] | None:
    """The pick by :data:`RULE`, with every configuration's interval; ``None`` when no trial has the metric.
    ``scored``: :func:`score_configs` of these rows and metric, when the caller already has it."""
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
    metric, maximize = parse_metric(metric)
    scored, base = scored if scored is not None else score_configs(rows, metric)
    if not scored:
        return None
    sign = 1.0 if maximize else -1.0
    ranking = sorted(scored, key=lambda c: (-sign * c["mean"], c["entropy_coef"], c["schedule"]))
    candidates = [c for c in ranking if c["significant"]] if base is not None else ranking
    if candidates:
        top = candidates[0]["mean"]
        tied = [c for c in candidates if sign * (top - c["mean"]) <= tolerance + 1e-12]
        tied.sort(key=lambda c: (c["val_nll"] if c["val_nll"] is not None else math.inf, c["entropy_coef"],
                                 c["schedule"]))
        best = tied[0]
    else:
        best, tied = base, [base]
    significant = bool(best["significant"]) if base is not None and best is not base else False
    return {
        **best,
        "metric": metric,
        "maximize": maximize,
        "significant": significant,
        "baseline": None if base is None else {"mean": base["mean"], "ci95": base["ci95"], "seeds": base["seeds"]},
        "reason": _reason(best, base, significant, metric, len(tied)),
        "rule": RULE.format(metric=metric, direction="higher is better" if maximize else "lower is better",
                            samples=BOOTSTRAP_SAMPLES, tol=tolerance),
        "tolerance": tolerance,
        "tied_with": [{k: c[k] for k in ("entropy_coef", "schedule", "mean", "val_nll")} for c in tied[1:]],
        "ranking": [{k: c[k] for k in ("entropy_coef", "schedule", "mean", "ci95", "paired_diff", "significant")}
                    | {"n_seeds": len(c["seeds"])} for c in ranking],
    }


def _reason(best: dict, base: dict | None, significant: bool, metric: str, n_tied: int) -> str:
    if base is None:
        return (f"best mean {metric} ({best['mean']:.4g}); no β = 0 run in the grid, so nothing says whether it beats "
                "the unregularized run beyond noise")
    if best is base:
        return (f"no β beat the unregularized run (β = 0) beyond noise on {metric}: every paired interval against "
                "β = 0 includes 0, so the pick is β = 0")
    d = best["paired_diff"]
    tie = f"; {n_tied} configurations tied, lowest NLL" if n_tied > 1 else ""
    return (f"beats β = 0 beyond noise on {metric}: paired difference {d['mean']:+.4g} (95% interval "
            f"[{d['ci95'][0]:+.4g}, {d['ci95'][1]:+.4g}]){tie}")


def seed_centred_correlation(points: Iterable[tuple[int, float, float]]) -> dict[str, float] | None:
    """Correlation of entropy and metric within seeds: each ``(seed, entropy, value)`` point minus its seed's means,
    then the Pearson correlation and least-squares slope of the centred values (so that the seeds' own offsets, e.g.
    different warm starts, do not pass for an effect of entropy). ``{"r", "slope", "n", "n_seeds"}``, or ``None`` with
    fewer than 3 points or no spread within seeds. A correlation, not a causal fit."""
    import numpy as np

    by_seed: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for seed, h, v in points:
        if _number(h) is not None and _number(v) is not None:
            by_seed[int(seed)].append((float(h), float(v)))
    xs, ys = [], []
    for pairs in by_seed.values():
        hm = sum(h for h, _ in pairs) / len(pairs)
        vm = sum(v for _, v in pairs) / len(pairs)
        xs += [h - hm for h, _ in pairs]
        ys += [v - vm for _, v in pairs]
    x, y = np.array(xs), np.array(ys)
    if len(x) < 3 or float((x ** 2).sum()) == 0 or float((y ** 2).sum()) == 0:
        return None
    r = float((x * y).sum() / np.sqrt((x ** 2).sum() * (y ** 2).sum()))
    return {"r": r, "slope": float((x * y).sum() / (x ** 2).sum()), "n": int(len(x)), "n_seeds": len(by_seed)}
