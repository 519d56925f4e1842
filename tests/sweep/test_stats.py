"""The intervals (``sweep/stats.py``): the hierarchical bootstrap over seeds and prompts and the paired difference,
against hand-computed distributions."""

from __future__ import annotations

import numpy as np
import pytest

from llm_entreg.sweep.stats import Interval, bootstrap_interval, paired_difference, point_estimate


def test_point_estimate_weights_seeds_equally():
    assert point_estimate({0: [1.0, 1.0, 1.0, 1.0], 1: [0.0]}) == 0.5  # not the pooled 0.8


def test_seed_resampling_by_hand():
    # two seeds with one prompt each: a resample's mean is 1 (1/4), 2 (1/2) or 3 (1/4): percentiles 2.5 / 97.5 = 1, 3
    assert bootstrap_interval({0: [1.0], 1: [3.0]}) == Interval(2.0, 1.0, 3.0)
    # one seed, two prompts: 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval({0: [0.0, 1.0]}) == Interval(0.5, 0.0, 1.0)
    flat = bootstrap_interval({0: [0.7, 0.7, 0.7]})  # no spread, no width
    assert (flat.mean, flat.lo, flat.hi) == pytest.approx((0.7, 0.7, 0.7))


def test_the_paired_difference_cancels_what_both_sides_share():
    rng = np.random.default_rng(3)
    prompts = {s: rng.normal(0, 1, 128) for s in range(3)}  # large prompt-to-prompt spread, shared by both sides
    seed_shift = {0: -2.0, 1: 0.0, 2: 2.0}  # and large seed-to-seed spread, also shared
    base = {s: list(prompts[s] + seed_shift[s]) for s in range(3)}
    better = {s: list(prompts[s] + seed_shift[s] + 0.1) for s in range(3)}
    diff = paired_difference(better, base)
    assert diff.mean == pytest.approx(0.1) and diff.lo == pytest.approx(0.1) and diff.hi == pytest.approx(0.1)
    assert diff.excludes_zero(maximize=True) and not diff.excludes_zero(maximize=False)
    alone = bootstrap_interval(better)  # unpaired, the same 0.1 would vanish in the spread
    assert alone.hi - alone.lo > 2.0


def test_paired_difference_uses_common_seeds_and_checks_prompt_counts():
    assert paired_difference({0: [1.0]}, {1: [0.0]}) is None
    assert paired_difference({0: [1.0], 1: [5.0]}, {0: [0.0]}).as_dict() == {"mean": 1.0, "ci95": [1.0, 1.0]}
    with pytest.raises(ValueError, match="seed 0: the paired values cover different numbers of prompts"):
        paired_difference({0: [1.0, 2.0]}, {0: [0.0]})
    with pytest.raises(ValueError, match="values: no seed"):
        bootstrap_interval({})


def test_reproducible():
    values = {s: list(np.random.default_rng(s).random(50)) for s in range(3)}
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)
