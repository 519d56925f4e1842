"""Flags on hand-made curves, the pick against β = 0 on hand-computed intervals (beyond noise, inside it, β = 0
better, no baseline, ties, a minimised metric), pass@k per prompt, the within-seed correlation, a trial's numbers."""

from __future__ import annotations

import pytest

from llm_entreg.sweep.pick import (Thresholds, held_out_flags, is_collapsed, is_never_committed, parse_metric,
                                   per_prompt_values, pick_best, seed_centred_correlation, trial_metrics, window_means)


def test_window_means_use_first_and_last_20_percent():
    assert window_means([1, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5]) == (1.0, 0.5)
    assert window_means([2.0, 1.0]) == (2.0, 1.0)  # at least one point each


def test_collapsed_flag():
    falling = [1.0, 0.9, 0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.2]  # first 20% mean 0.95, last 0.2
    assert is_collapsed(falling) is True
    assert is_collapsed([1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.55, 0.55, 0.5, 0.5]) is False  # 0.5 >= 0.5 * 0.95
    assert is_collapsed([1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.55, 0.55, 0.5, 0.5], Thresholds(collapse_fraction=0.6)) is True
    assert is_collapsed([0.5]) is None


def test_never_committed_flag_catches_flat_and_runaway_entropy():
    flat = [0.50, 0.52, 0.49, 0.51, 0.50, 0.48, 0.50, 0.53, 0.51, 0.52]
    assert is_never_committed(flat, 0.44, 0.445) is True            # flat and +0.005 < 0.01
    assert is_never_committed(flat, 0.44, 0.50) is False            # flat but the reward moved
    assert is_never_committed(flat, 0.44, 0.445, Thresholds(commit_min_gain=0.001)) is False
    runaway = [0.5, 0.5, 0.9, 1.5, 2.5, 3.5, 4.5, 5.0, 5.5, 5.5]     # towards log V: the extreme form
    assert is_never_committed(runaway, 0.44, 0.0) is True
    assert is_never_committed(runaway, 0.44, 0.60) is False          # it rose, but the reward moved
    falling = [1.0, 0.9, 0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.2]
    assert is_never_committed(falling, 0.44, 0.44) is False          # it committed (here without gain)
    assert is_never_committed(flat, None, 0.5) is None


def test_flags_on_held_out_samples():
    before = {"entropy": 1.2, "sampled_accuracy": 0.6}
    assert held_out_flags(before, {"entropy": 0.1, "sampled_accuracy": 0.9}) == {
        "collapsed_held_out": True, "never_committed_held_out": False}
    assert held_out_flags(before, {"entropy": 5.5, "sampled_accuracy": 0.0}) == {
        "collapsed_held_out": False, "never_committed_held_out": True}
    assert held_out_flags({}, {"entropy": 1.0})["collapsed_held_out"] is None


def _row(coef, values, seed=0, sched="constant", nll=None, status="complete"):
    """A trial row with per-prompt held-out rewards (and their mean as the summary number)."""
    return {"id": f"{coef}-{sched}-{seed}", "entropy_coef": coef, "schedule": sched, "seed": seed, "status": status,
            "val_reward": sum(values) / len(values), "val_nll": nll, "per_prompt": {"reward": list(values)}}


def test_a_beta_beyond_noise_is_picked_with_its_paired_interval():
    rows = [_row(0.0, [0.0, 0.0], seed=s) for s in (0, 1)] + [_row(0.1, [1.0, 1.0], seed=s) for s in (0, 1)]
    rows += [_row(0.01, [0.5, 0.0], seed=0), _row(0.01, [0.0, 0.0], seed=1)]
    best = pick_best(rows)
    # every resample of β = 0.1 - β = 0 is 1: interval [1, 1]. β = 0.01 differs by [0.5, 0] on seed 0's prompts and
    # [0, 0] on seed 1's: mean 0.125. A resample's mean is 0.5 only when both seed draws are seed 0 (1/4) and both
    # resample its 0.5-prompt twice (1/16 each): 1/64 < 2.5%; it is >= 0.375 with 5/64 > 2.5%: upper end 0.375
    assert (best["entropy_coef"], best["mean"], best["ci95"], best["significant"]) == (0.1, 1.0, [1.0, 1.0], True)
    assert best["paired_diff"] == {"mean": 1.0, "ci95": [1.0, 1.0]}
    assert best["baseline"] == {"mean": 0.0, "ci95": [0.0, 0.0], "seeds": [0, 1]}
    assert "beats β = 0 beyond noise" in best["reason"]
    small = next(c for c in best["ranking"] if c["entropy_coef"] == 0.01)
    assert small["paired_diff"]["mean"] == pytest.approx(0.125) and small["paired_diff"]["ci95"] == [0.0, 0.375]
    assert small["significant"] is False


def test_inside_the_noise_the_pick_is_beta_zero_and_says_so():
    # seed 0: +0.2 over β = 0; seed 1: -0.2: resampled seed means are -0.2, 0, +0.2 -> the interval [-0.2, 0.2]
    rows = [_row(0.0, [0.5], seed=0), _row(0.0, [0.5], seed=1), _row(0.1, [0.7], seed=0), _row(0.1, [0.3], seed=1)]
    best = pick_best(rows)
    assert best["entropy_coef"] == 0.0 and best["significant"] is False
    assert best["reason"].startswith("no β beat the unregularized run (β = 0) beyond noise")
    other = next(c for c in best["ranking"] if c["entropy_coef"] == 0.1)
    assert other["paired_diff"]["mean"] == pytest.approx(0.0) and other["paired_diff"]["ci95"] == pytest.approx([-0.2, 0.2])


def test_when_beta_zero_wins_it_is_the_pick():
    rows = [_row(0.0, [0.9, 0.8], seed=s) for s in (0, 1, 2)] + [_row(0.1, [0.2, 0.1], seed=s) for s in (0, 1, 2)]
    best = pick_best(rows)
    assert best["entropy_coef"] == 0.0 and not best["significant"]
    assert next(c for c in best["ranking"] if c["entropy_coef"] == 0.1)["paired_diff"]["ci95"] == pytest.approx([-0.7, -0.7])


def test_without_a_baseline_the_best_mean_is_reported_as_untested():
    best = pick_best([_row(0.01, [0.4]), _row(0.1, [0.6])])
    assert best["entropy_coef"] == 0.1 and best["baseline"] is None and best["significant"] is False
    assert "no β = 0 run" in best["reason"]
    assert pick_best([_row(0.1, [0.5], status="failed")]) is None


def test_ties_within_tolerance_go_to_the_lower_nll_then_the_smaller_beta():
    rows = [_row(0.0, [0.0], seed=s) for s in (0, 1)]
    rows += [_row(0.01, [0.9], seed=s, nll=0.6) for s in (0, 1)] + [_row(0.1, [0.88], seed=s, nll=0.3) for s in (0, 1)]
    assert pick_best(rows)["entropy_coef"] == 0.01
    tied = pick_best(rows, tolerance=0.05)
    assert tied["entropy_coef"] == 0.1 and tied["tied_with"][0]["entropy_coef"] == 0.01


def test_nll_is_minimised_and_pass_at_k_comes_from_correct_counts():
    rows = [dict(_row(0.0, [0.5], seed=s), per_prompt={"nll": [0.9, 0.8], "correct": [4, 0], "num_samples": 4})
            for s in (0, 1)]
    rows += [dict(_row(0.1, [0.5], seed=s), per_prompt={"nll": [0.5, 0.4], "correct": [1, 2], "num_samples": 4})
             for s in (0, 1)]
    best = pick_best(rows, metric="nll")
    assert best["entropy_coef"] == 0.1 and best["maximize"] is False and best["paired_diff"]["mean"] == pytest.approx(-0.4)
    # pass@2 of 4 samples: c=4 -> 1, c=0 -> 0, c=1 -> 1 - C(3,2)/C(4,2) = 0.5, c=2 -> 1 - 1/6
    assert per_prompt_values(rows[0], "pass@2") == [1.0, 0.0]
    assert per_prompt_values(rows[2], "pass@2") == pytest.approx([0.5, 5 / 6])
    assert per_prompt_values(rows[0], "pass@8") is None  # k > samples and no summary number
    with pytest.raises(ValueError, match="--pick-metric"):
        parse_metric("accuracy")


def test_correlation_is_taken_within_seeds():
    # the seeds differ by a large offset; within each seed the metric rises with entropy one for one
    points = [(0, 1.0, 1.0), (0, 2.0, 2.0), (1, 10.0, 0.0), (1, 11.0, 1.0)]
    c = seed_centred_correlation(points)
    assert c["r"] == pytest.approx(1.0) and c["slope"] == pytest.approx(1.0) and (c["n"], c["n_seeds"]) == (4, 2)
    # across seeds a pooled fit would see a strong negative trend; within seeds there is none
    flat = [(0, 1.0, 5.0), (0, 2.0, 5.0), (0, 3.0, 5.0), (1, 10.0, 0.0), (1, 11.0, 0.0)]
    assert seed_centred_correlation(flat) is None  # no spread of the metric within seeds


def test_trial_metrics_from_summary_and_fallback_to_logged_reward(tmp_path):
    history = [{"step": s, "entropy": 1.0 - 0.09 * s, "entropy_coef": 0.01, "rewards/accuracies": 0.5 + 0.01 * s}
               for s in range(1, 11)]
    summary = {"steps": 10, "held_out_before": {"reward": 0.4, "entropy": 0.6},
               "held_out_after": {"reward": 0.5, "nll": 0.3, "entropy": 0.2, "pass_at_k": {"1": 0.5, "16": 0.9},
                                  "distinct_correct": 3.0, "num_samples": 16,
                                  "per_prompt": {"reward": [0.0, 1.0], "correct": [4, 12], "nll": [0.2, 0.4]}}}
    m = trial_metrics(summary, history)
    assert (m["val_reward"], m["reward_before"], m["val_nll"], m["val_entropy"]) == (0.5, 0.4, 0.3, 0.2)
    assert (m["val_pass@1"], m["val_pass@16"], m["val_distinct_correct"], m["val_entropy_before"]) == (0.5, 0.9, 3.0, 0.6)
    assert m["per_prompt"]["correct"] == [4, 12] and m["per_prompt"]["num_samples"] == 16
    assert m["collapsed_held_out"] is True
    assert m["reward_source"] == "held_out_after.reward" and m["collapsed"] is True and m["never_committed"] is False
    m = trial_metrics({"held_out_after": None}, history)  # no held-out evaluation: last logged reward-like metric
    assert m["reward_source"] == "last logged rewards/accuracies" and m["val_reward"] == pytest.approx(0.6)
    assert m["reward_before"] == pytest.approx(0.51) and m["val_nll"] is None

