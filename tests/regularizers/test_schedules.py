"""Schedules at start / warmup / mid / end, against hand-computed numbers."""

from __future__ import annotations

import pytest

from llm_entreg.regularizers import make_schedule


def test_linear_with_warmup():
    s = make_schedule("linear", entropy_coef=1.0, entropy_coef_end=0.0, entropy_schedule_steps=10, entropy_warmup_steps=2)
    # warmup from 0: 0, 1/2; peak at step 2; decay p = (step - 2) / 8
    assert s.value(0) == 0.0
    assert s.value(1) == 0.5
    assert s.value(2) == 1.0
    assert s.value(6) == 0.5  # p = 0.5
    assert s.value(8) == pytest.approx(0.25)  # p = 0.75
    assert s.value(10) == 0.0
    assert s.value(15) == 0.0  # held at end
    assert s(6) == s.value(6)


def test_cosine():
    s = make_schedule("cosine", entropy_coef=1.0, entropy_coef_end=0.0, entropy_schedule_steps=10, entropy_warmup_steps=2)
    assert s.value(2) == 1.0
    # p = 0.25: (1 + cos(pi/4)) / 2 = (1 + 0.70710678) / 2 = 0.85355339
    assert s.value(4) == pytest.approx(0.85355339)
    assert s.value(6) == pytest.approx(0.5)  # p = 0.5: cos(pi/2) = 0
    assert s.value(10) == pytest.approx(0.0)
    up = make_schedule("cosine", entropy_coef=0.0, entropy_coef_end=0.2, entropy_schedule_steps=4)
    # increasing is fine: p = 0.5 -> 0.2 + (0 - 0.2) * 0.5 = 0.1
    assert up.value(2) == pytest.approx(0.1)


def test_exponential():
    s = make_schedule("exponential", entropy_coef=1e-2, entropy_coef_end=1e-4, entropy_schedule_steps=10)
    assert s.value(0) == 1e-2
    # 1e-2 * (1e-2) ** 0.2 = 1e-2 * 10 ** -0.4 = 3.981071705534972e-3
    assert s.value(2) == pytest.approx(3.981071705534972e-3)
    assert s.value(5) == pytest.approx(1e-3)  # geometric midpoint
    assert s.value(10) == 1e-4
    assert s.value(11) == 1e-4
    with pytest.raises(ValueError, match="entropy_coef_end"):
        make_schedule("exponential", entropy_coef=1e-2, entropy_coef_end=0.0, entropy_schedule_steps=10)
    with pytest.raises(ValueError, match="entropy_coef"):
        make_schedule("exponential", entropy_coef=0.0, entropy_coef_end=1e-3, entropy_schedule_steps=10)


def test_constant_with_warmup_and_value_alias():
    s = make_schedule("constant", value=0.01, entropy_warmup_steps=4)
    assert [s.value(i) for i in (0, 1, 2, 4, 1000)] == pytest.approx([0.0, 0.0025, 0.005, 0.01, 0.01])
    assert make_schedule("constant", entropy_coef=0.3).value(7) == 0.3


def test_warmup_equal_to_total_jumps_to_end():
    s = make_schedule("linear", entropy_coef=1.0, entropy_coef_end=0.5, entropy_schedule_steps=4, entropy_warmup_steps=4)
    assert s.value(2) == 0.5  # warmup: 1.0 * 2/4
    assert s.value(4) == 0.5  # end


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("linear", {"entropy_coef": 1.0, "entropy_schedule_steps": 0}, "entropy_schedule_steps"),
        ("linear", {"entropy_coef": 1.0, "entropy_schedule_steps": 5, "entropy_warmup_steps": 6}, "entropy_warmup_steps"),
        ("linear", {"entropy_coef": 1.0, "entropy_schedule_steps": 5, "entropy_warmup_steps": -1}, "entropy_warmup_steps"),
        ("linear", {"entropy_coef": float("nan"), "entropy_schedule_steps": 5}, "entropy_coef"),
        ("linear", {"entropy_coef_end": 0.0, "entropy_schedule_steps": 5}, "entropy_coef"),
        ("linear", {"entropy_coef": 1.0, "entropy_schedule_steps": 5, "steps": 3}, "steps"),
        ("step", {"entropy_coef": 1.0}, "entropy_schedule"),
        ("constant", {"entropy_coef": 1.0, "value": 1.0}, "value"),
    ],
)
def test_validation_names_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_schedule(name, **kwargs)


def test_step_must_be_a_non_negative_int():
    s = make_schedule("linear", entropy_coef=1.0, entropy_schedule_steps=5)
    with pytest.raises(ValueError, match="step"):
        s.value(-1)
    with pytest.raises(ValueError, match="step"):
        s.value(1.5)
