"""Grid parsing: lists, log ranges (hand values), the product, trial ids, the overrides a trial gets."""

from __future__ import annotations

import pytest

from llm_entreg.sweep.grid import (GridError, build_trials, format_coef, log_range, parse_float_list, parse_int_list,
                                   parse_log_range, parse_schedules, trial_id, trial_overrides)


def test_log_range_hand_values():
    assert parse_log_range("1e-4:1e-1", 4) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert log_range(1e-4, 1e-1, 4, include_zero=True) == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
    assert parse_log_range("1e-2:1", 3) == [1e-2, 1e-1, 1.0]
    mid = parse_log_range("1e-4:1e-2", 3)
    assert mid[1] == pytest.approx(1e-3) and mid[1] == 1e-3  # rounded to 12 significant digits: exact
    assert parse_log_range({"start": 1e-3, "stop": 1e-1, "points": 3, "include_zero": True}) == [0.0, 1e-3, 1e-2, 1e-1]
    assert parse_log_range("0.5:0.5", 1) == [0.5]
    assert parse_log_range("1e-4:1e-1") == [1e-4, 1e-3, 1e-2, 1e-1]  # --points defaults to 4


@pytest.mark.parametrize("spec, points, pattern", [
    ("0:1e-1", 4, "> 0"), ("1e-4-1e-1", 4, "START:STOP"), ("1e-4:1e-1", 0, "integer >= 1"),
("a:1", 3, "number"),
])
def test_log_range_errors(spec, points, pattern):
    with pytest.raises(GridError, match=pattern):
        parse_log_range(spec, points)


def test_lists_and_schedules():
    assert parse_float_list("0,1e-4, 1e-3,1e-3") == [0.0, 1e-4, 1e-3]
    assert parse_float_list([0, "1e-2"]) == [0.0, 0.01]
    assert parse_int_list("0,1") == [0, 1] and parse_int_list(3) == [3]
    assert parse_schedules("constant,linear,exp,none") == ["constant", "linear", "exponential"]
    with pytest.raises(GridError, match="unknown schedule 'warp'"):
        parse_schedules("constant,warp")
    with pytest.raises(GridError, match="number"):
        parse_float_list("0,abc")
    with pytest.raises(GridError, match="integers"):
        parse_int_list("0,1.5")


def test_product_ids_and_zero_runs_once_per_seed():
    trials = build_trials([0.0, 1e-3], ["constant", "linear"], [0, 1])
    assert [t.id for t in trials] == [
        "coef=0_sched=constant_seed=0", "coef=0_sched=constant_seed=1",
        "coef=1e-3_sched=constant_seed=0", "coef=1e-3_sched=constant_seed=1",
        "coef=1e-3_sched=linear_seed=0", "coef=1e-3_sched=linear_seed=1",
    ]
    assert format_coef(3.16227766e-3) == "3.16228e-3" and format_coef(0.02) == "2e-2" and format_coef(1.0) == "1e0"
    assert trial_id(1e-3, "constant", 0) == "coef=1e-3_sched=constant_seed=0"


def test_trial_overrides_map_schedules_to_recipe_fields():
    const, lin, expo, ctrl = build_trials([1e-2], ["constant", "linear", "exponential", "target_entropy"], [3])
    assert trial_overrides(const) == ["entropy_coef=0.01", "entropy_schedule=null", "entropy_controller=null", "seed=3"]
    assert "entropy_schedule=linear" in trial_overrides(lin) and "entropy_coef_end=0.0001" in trial_overrides(lin)
    assert "entropy_coef_end=0.001" in trial_overrides(expo, end_ratio=0.1)
    assert "entropy_controller=target_entropy" in trial_overrides(ctrl)
