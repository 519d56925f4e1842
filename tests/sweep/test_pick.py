"""Flags on hand-made curves, the pick rule (tolerance, NLL tie-break, seeds), the exp(H) fit, the metrics of a trial."""

from __future__ import annotations

import math

import pytest

from llm_entreg.sweep.pick import (Thresholds, fit_exp_entropy, is_collapsed, is_never_committed, pick_best,
                                   trial_metrics, window_means)


def test_window_means_use_first_and_last_20_percent():
    assert window_means([1, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5]) == (1.0, 0.5)
    assert window_means([2.0, 1.0]) == (2.0, 1.0)  # at least one point each


def test_collapsed_flag():
    falling = [1.0, 0.9, 0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.2]  # first 20% mean 0.95, last 0.2
    assert is_collapsed(falling) is True
    assert is_collapsed([1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.55, 0.55, 0.5, 0.5]) is False  # 0.5 >= 0.5 * 0.95
    assert is_collapsed([1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.55, 0.55, 0.5, 0.5], Thresholds(collapse_fraction=0.6)) is True
    assert is_collapsed([0.5]) is None


def test_never_committed_flag():
    flat = [0.50, 0.52, 0.49, 0.51, 0.50, 0.48, 0.50, 0.53, 0.51, 0.52]
    assert is_never_committed(flat, 0.44, 0.445) is True            # flat and +0.005 < 0.01
    assert is_never_committed(flat, 0.44, 0.50) is False            # flat but the reward moved
    assert is_never_committed(flat, 0.44, 0.445, Thresholds(commit_min_gain=0.001)) is False
    rising = [0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.9, 0.9]
    assert is_never_committed(rising, 0.44, 0.44) is False           # entropy moved by 80%
    assert is_never_committed(rising, 0.44, 0.44, Thresholds(commit_band=1.0)) is True
    assert is_never_committed(flat, None, 0.5) is None


def _row(coef, reward, nll=None, seed=0, sched="constant", status="complete"):
    return {"id": f"{coef}-{sched}-{seed}", "entropy_coef": coef, "schedule": sched, "seed": seed, "status": status,
            "val_reward": reward, "val_nll": nll}


def test_pick_highest_reward():
    best = pick_best([_row(0.0, 0.40, 0.5), _row(1e-3, 0.47, 0.6), _row(1e-2, 0.45, 0.3)])
    assert best["entropy_coef"] == 1e-3 and best["val_reward"] == 0.47
    assert "highest validation reward" in best["rule"] and "lowest" in best["rule"]
    assert [c["entropy_coef"] for c in best["ranking"]] == [1e-3, 1e-2, 0.0]


def test_pick_ties_within_tolerance_go_to_lower_nll():
    rows = [_row(0.0, 0.40, 0.5), _row(1e-3, 0.47, 0.6), _row(1e-2, 0.45, 0.3)]
    best = pick_best(rows, tolerance=0.03)
    assert best["entropy_coef"] == 1e-2 and "lowest validation NLL" in best["reason"]
    assert best["tied_with"][0]["entropy_coef"] == 1e-3
    # exact ties with tolerance 0, and the NLL decides; a missing NLL ranks last; then the smaller β
    assert pick_best([_row(1e-3, 0.5, None), _row(1e-2, 0.5, 0.9)])["entropy_coef"] == 1e-2
    assert pick_best([_row(1e-1, 0.5, 0.4), _row(1e-2, 0.5, 0.4)])["entropy_coef"] == 1e-2


def test_pick_averages_seeds_and_skips_failures():
    rows = [_row(1e-3, 0.60, 0.4, seed=0), _row(1e-3, 0.30, 0.4, seed=1),  # mean 0.45
            _row(1e-2, 0.50, 0.4, seed=0), _row(1e-2, 0.48, 0.4, seed=1),  # mean 0.49
            _row(1e-1, 0.99, 0.1, seed=0, status="failed")]
    best = pick_best(rows)
    assert best["entropy_coef"] == 1e-2 and best["val_reward"] == pytest.approx(0.49) and best["seeds"] == [0, 1]
    assert pick_best([_row(1e-1, None, None)]) is None


def test_fit_recovers_a_and_b():
    hs = [0.2, 0.4, 0.7, 1.0, 1.5]
    fit = fit_exp_entropy(hs, [-0.3 * math.exp(h) + 1.2 for h in hs])
    assert fit["a"] == pytest.approx(0.3) and fit["b"] == pytest.approx(1.2) and fit["r2"] == pytest.approx(1.0)
    assert fit_exp_entropy([0.5, 0.5], [0.1, 0.2]) is None


def test_trial_metrics_from_summary_and_fallback_to_logged_reward(tmp_path):
    history = [{"step": s, "entropy": 1.0 - 0.09 * s, "entropy_coef": 0.01, "rewards/accuracies": 0.5 + 0.01 * s}
               for s in range(1, 11)]
    summary = {"steps": 10, "held_out_before": {"reward": 0.4}, "held_out_after": {"reward": 0.5, "nll": 0.3,
                                                                                     "entropy": 0.2}}
    m = trial_metrics(summary, history)
    assert (m["val_reward"], m["reward_before"], m["val_nll"], m["val_entropy"]) == (0.5, 0.4, 0.3, 0.2)
    assert m["reward_source"] == "held_out_after.reward" and m["collapsed"] is True and m["never_committed"] is False
    m = trial_metrics({"held_out_after": None}, history)  # no held-out evaluation: last logged reward-like metric
    assert m["reward_source"] == "last logged rewards/accuracies" and m["val_reward"] == pytest.approx(0.6)
    assert m["reward_before"] == pytest.approx(0.51) and m["val_nll"] is None

