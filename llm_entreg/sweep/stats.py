"""Signal or noise: a configuration's mean over seeds and held-out prompts with a 95% interval, and its paired
difference from the β = 0 baseline, from a hierarchical bootstrap that resamples seeds and, within each drawn seed,
its prompts. The method and how to read it: docs/sweep.md ("Signal or noise").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bootstrap resamples (and the fixed seed that makes the intervals reproducible).
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0

Values = dict[int, list[float]]  # seed -> per-prompt values (one value per held-out prompt)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval."""

    mean: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi]}

    def excludes_zero(self, maximize: bool) -> bool:
        """Whether the interval lies wholly on the better side of 0."""
        return self.lo > 0 if maximize else self.hi < 0


def point_estimate(values: Values) -> float:
    """Mean over seeds of each seed's mean over its prompts."""
    return float(np.mean([np.mean(v) for v in values.values()]))


def _resampled(values: list[Values], seeds: list[int], samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each set of values (sharing seeds and prompts), ``samples`` bootstrap means with the same draws: seeds with
    replacement, then each drawn seed's prompts with replacement."""
    n_seeds = len(seeds)
    picks = rng.integers(n_seeds, size=(samples, n_seeds))
    totals = [np.zeros((samples, n_seeds)) for _ in values]
    for j, seed in enumerate(seeds):
        arrays = [np.asarray(v[seed], dtype=float) for v in values]
        sizes = {a.shape[0] for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"seed {seed}: the paired values cover different numbers of prompts {sorted(sizes)}")
        n_prompts = sizes.pop()
        idx = rng.integers(n_prompts, size=(samples, n_seeds, n_prompts))
        drawn = picks == j
        for total, array in zip(totals, arrays):
            total[drawn] = array[idx].mean(axis=-1)[drawn]
    return [total.mean(axis=1) for total in totals]


def _interval(point: float, draws: np.ndarray) -> Interval:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Interval(point, float(lo), float(hi))


def bootstrap_interval(values: Values, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """The mean over seeds and prompts, with a 95% percentile interval from the hierarchical bootstrap."""
    if not values:
        raise ValueError("values: no seed")
    seeds = sorted(values)
    (draws,) = _resampled([values], seeds, samples, np.random.default_rng(seed))
    return _interval(point_estimate(values), draws)


def paired_difference(values: Values, baseline: Values, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> Interval | None:
    """``values - baseline`` on the seeds both have, with the same seed and prompt draws for both sides (each seed's
    prompts are the same held-out prompts for both); None without a common seed."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    a, b = _resampled([values, baseline], seeds, samples, np.random.default_rng(seed))
    common_a = {s: values[s] for s in seeds}
    common_b = {s: baseline[s] for s in seeds}
    return _interval(point_estimate(common_a) - point_estimate(common_b), a - b)


__all__ = ["BOOTSTRAP_SAMPLES", "Interval", "bootstrap_interval", "paired_difference", "point_estimate"]
