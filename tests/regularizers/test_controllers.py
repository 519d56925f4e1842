"""Coefficient sources: controller trajectories, learned alpha, state_dict round trips, the factory."""

from __future__ import annotations

import io
import math

import pytest
import torch

from llm_entreg.regularizers import (
    AdaptiveKLController,
    ConstantCoefficient,
    LearnedAlpha,
    ScheduledCoefficient,
    TargetEntropyController,
    make_coefficient,
    make_schedule,
)


def test_target_entropy_controller_trajectory():
    ctl = TargetEntropyController(
        entropy_coef=0.0, entropy_target=0.2, entropy_coef_delta=0.005, entropy_coef_min=0.0, entropy_coef_max=0.012
    )
    assert ctl.value == 0.0  # nothing measured yet: not below target
    # (measured H, raw c after the step, applied value after the step)
    expected = [
        (0.5, 0.0, 0.0),  # above: 0 - 0.005 clamped to min 0; not applied
        (0.15, 0.005, 0.005),  # below: +0.005, applied
        (0.1, 0.010, 0.010),
        (0.19, 0.012, 0.012),  # 0.015 clamped to max 0.012
        (0.2, 0.012, 0.0),  # at target: c unchanged, not below -> not applied
        (0.3, 0.007, 0.0),  # above: -0.005
        (0.05, 0.012, 0.012),
        (0.05, 0.012, 0.012),  # held at max
    ]
    for h, coef, value in expected:
        assert ctl.step(h) == pytest.approx(value)
        assert ctl.coef == pytest.approx(coef)
        assert ctl.value == pytest.approx(value)
    assert ctl.num_steps == len(expected)
    assert ctl.applies(0.1) and not ctl.applies(0.3) and not ctl.applies(None)


def test_target_entropy_controller_always_applies_without_the_option():
    ctl = TargetEntropyController(entropy_coef=0.01, only_below_target=False)
    assert ctl.value == 0.01
    ctl.step(torch.tensor(0.9))  # tensors are accepted; above 0.2 -> 0.005, still applied
    assert ctl.value == pytest.approx(0.005)
    assert ctl.applies(5.0)
    with pytest.raises(ValueError, match="measured_entropy"):
        ctl.step(None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"entropy_coef_delta": 0.0}, "entropy_coef_delta"),
        ({"entropy_target": -0.1}, "entropy_target"),
        ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.1}, "entropy_coef_max"),
        ({"entropy_coef": 2.0}, "entropy_coef"),
        ({"entropy_coef_min": -0.1}, "entropy_coef_min"),
    ],
)
def test_target_entropy_controller_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TargetEntropyController(**kwargs)


def test_learned_alpha_first_adam_steps():
    # Adam's first step moves log alpha by lr * g / (|g| + eps) = lr * sign(g)
    below = LearnedAlpha(entropy_coef=1.0, entropy_target=1.0, entropy_alpha_lr=0.1)
    assert below.step(0.5) == pytest.approx(math.exp(0.1))  # g = 0.5 - 1 < 0 -> log alpha 0 -> +0.1
    assert below.step(0.5) == pytest.approx(math.exp(0.2))  # same gradient again: another +0.1
    above = LearnedAlpha(entropy_coef=1.0, entropy_target=1.0, entropy_alpha_lr=0.1)
    assert above.step(1.5) == pytest.approx(math.exp(-0.1))  # g = +0.5 -> -0.1: alpha shrinks


def test_learned_alpha_grows_below_and_shrinks_above_target():
    low = LearnedAlpha(entropy_coef=1e-3, entropy_target=0.5, entropy_alpha_lr=0.05)
    high = LearnedAlpha(entropy_coef=1e-3, entropy_target=0.5, entropy_alpha_lr=0.05)
    lows, highs = [low.value], [high.value]
    for _ in range(5):
        lows.append(low.step(0.2))
        highs.append(high.step(0.9))
    assert all(b > a for a, b in zip(lows, lows[1:]))
    assert all(b < a for a, b in zip(highs, highs[1:]))


def test_learned_alpha_target_from_initial_entropy():
    ctl = LearnedAlpha(entropy_coef=1.0, entropy_target_ratio=0.5, entropy_alpha_lr=0.1)
    # first measurement 2.0 fixes the target at 1.0; g = 2 - 1 = 1 -> log alpha = -0.1
    assert ctl.step(2.0) == pytest.approx(math.exp(-0.1))
    assert ctl.target_entropy == 1.0 and ctl.initial_entropy == 2.0
    # second: g = 0.8 - 1 = -0.2 (target stays 1.0). Adam by hand (b1 = 0.9, b2 = 0.999):
    #   m = 0.9 * 0.1 + 0.1 * (-0.2) = 0.07,        m_hat = 0.07 / (1 - 0.81)     = 0.368421
    #   v = 0.999 * 0.001 + 0.001 * 0.04 = 0.001039, v_hat = 0.001039 / 0.001999 = 0.519760, sqrt = 0.720944
    #   log alpha = -0.1 - 0.1 * 0.368421 / 0.720944 = -0.151103 (momentum still pushes down)
    assert math.log(ctl.step(0.8)) == pytest.approx(-0.151103, abs=1e-6)
    assert ctl.target_entropy == 1.0


def test_learned_alpha_clamps_and_validation():
    ctl = LearnedAlpha(entropy_coef=1.0, entropy_target=1.0, entropy_alpha_lr=0.5, max_alpha=1.2)
    assert ctl.step(0.0) == pytest.approx(1.2)  # e^0.5 = 1.65 clamped
    with pytest.raises(ValueError, match="entropy_coef"):
        LearnedAlpha(entropy_coef=0.0)
    with pytest.raises(ValueError, match="entropy_target_ratio"):
        LearnedAlpha(entropy_target=0.3, entropy_target_ratio=0.5)
    with pytest.raises(ValueError, match="entropy_target_ratio"):
        LearnedAlpha(entropy_target_ratio=1.5)
    with pytest.raises(ValueError, match="entropy_alpha_lr"):
        LearnedAlpha(entropy_alpha_lr=0.0)
    assert LearnedAlpha().target_entropy_ratio == 0.5  # the default when no target is given


# ---------------------------------------------------------------------------------------------------------------
# state_dict: 5 steps, save, fresh object, load, 5 more == 10 uninterrupted steps, exactly
# ---------------------------------------------------------------------------------------------------------------
ENTROPIES = [0.9, 0.4, 0.15, 0.1, 0.3, 0.05, 0.25, 0.19, 0.6, 0.12]

FACTORIES = {
    "constant": lambda: ConstantCoefficient(0.01),
    "schedule": lambda: ScheduledCoefficient(make_schedule("cosine", entropy_coef=0.01, entropy_schedule_steps=8, entropy_warmup_steps=2)),
    "target_entropy": lambda: TargetEntropyController(entropy_coef=0.0, entropy_coef_max=0.02),
    "learned_alpha_abs": lambda: LearnedAlpha(entropy_coef=1e-3, entropy_target=0.2, entropy_alpha_lr=0.05),
    "learned_alpha_ratio": lambda: LearnedAlpha(entropy_coef=1e-3, entropy_target_ratio=0.3, entropy_alpha_lr=0.05),
}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_resume_reproduces_trajectory(name):
    full = FACTORIES[name]()
    uninterrupted = [full.value] + [full.step(h) for h in ENTROPIES]

    first = FACTORIES[name]()
    part1 = [first.value] + [first.step(h) for h in ENTROPIES[:5]]
    state = _roundtrip(first.state_dict())
    for h in ENTROPIES[5:]:  # stepping the old object further must not alter the saved state
        first.step(h)
    resumed = FACTORIES[name]()
    resumed.load_state_dict(state)
    assert resumed.value == part1[-1]
    part2 = [resumed.step(h) for h in ENTROPIES[5:]]
    assert part1 + part2 == uninterrupted  # exact equality, not approx
    assert resumed.num_steps == 10


def test_adaptive_kl_resume_reproduces_trajectory():
    kls = [9.0, 3.0, 6.6, 7.0, 1.0, 12.0, 5.0, 6.0, 6.1, 2.0]
    full = AdaptiveKLController()
    uninterrupted = [full.update(k, 256) for k in kls]
    first = AdaptiveKLController()
    part1 = [first.update(k, 256) for k in kls[:5]]
    resumed = AdaptiveKLController()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert part1 + [resumed.update(k, 256) for k in kls[5:]] == uninterrupted


def test_load_into_wrong_kind_fails():
    with pytest.raises(ValueError, match="state_dict"):
        ConstantCoefficient(0.1).load_state_dict(LearnedAlpha().state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        ScheduledCoefficient(make_schedule("linear", entropy_coef=1.0, entropy_schedule_steps=3)).load_state_dict(
            ScheduledCoefficient(make_schedule("cosine", entropy_coef=1.0, entropy_schedule_steps=3)).state_dict()
        )


# ---------------------------------------------------------------------------------------------------------------
# make_coefficient
# ---------------------------------------------------------------------------------------------------------------


def test_make_coefficient_kinds():
    const = make_coefficient(0.01)
    assert isinstance(const, ConstantCoefficient) and const.value == 0.01 and const.step() == 0.01
    assert not const.needs_entropy

    sched = make_coefficient(1.0, entropy_schedule="linear", entropy_coef_end=0.0, entropy_schedule_steps=4)
    # start = entropy_coef = 1.0 -> 1.0, 0.75, 0.5, 0.25, 0.0, 0.0
    assert [sched.value] + [sched.step() for _ in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]

    for name in ("target_entropy", "skywork", "adaptive"):
        ctl = make_coefficient(0.0, entropy_controller=name, entropy_target=0.3)
        assert isinstance(ctl, TargetEntropyController) and ctl.entropy_target == 0.3 and ctl.needs_entropy

    alpha = make_coefficient(1e-3, entropy_controller="sac", entropy_target_ratio=0.4)
    assert isinstance(alpha, LearnedAlpha) and alpha.value == pytest.approx(1e-3)


def test_make_coefficient_negative_needs_flag():
    with pytest.raises(ValueError, match="entropy_coef"):
        make_coefficient(-0.01)
    assert make_coefficient(-0.01, allow_entropy_minimization=True).value == -0.01
    with pytest.raises(ValueError, match="entropy_coef_end"):
        make_coefficient(0.01, entropy_schedule="linear", entropy_coef_end=-0.01, entropy_schedule_steps=3)
    ok = make_coefficient(
        0.01, entropy_schedule="linear", entropy_coef_end=-0.01, entropy_schedule_steps=2,
        allow_entropy_minimization=True,
    )
    assert ok.step() == pytest.approx(0.0) and ok.step() == pytest.approx(-0.01)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"entropy_schedule": "linear", "entropy_controller": "sac", "entropy_schedule_steps": 3},
         "entropy_controller"),
        ({"entropy_controller": "pid"}, "entropy_controller"),
        ({"entropy_schedule": "stairs", "entropy_schedule_steps": 3}, "entropy_schedule"),
        ({"entropy_schedule": "linear"}, "entropy_schedule_steps"),
        ({"entropy_schedule": "linear", "entropy_schedule_steps": 0}, "entropy_schedule_steps"),
        ({"entropy_schedule": "linear", "entropy_schedule_steps": 3, "entropy_warmup_steps": 4},
         "entropy_warmup_steps"),
        ({"entropy_controller": "target_entropy", "entropy_target": -0.2}, "entropy_target"),
        ({"entropy_controller": "target_entropy", "entropy_coef_delta": 0.0}, "entropy_coef_delta"),
        ({"entropy_controller": "target_entropy", "entropy_coef_max": -1.0}, "entropy_coef_max"),
        ({"entropy_controller": "sac", "entropy_alpha_lr": 0.0}, "entropy_alpha_lr"),
        ({"entropy_controller": "sac", "entropy_target_ratio": 1.5}, "entropy_target_ratio"),
        ({"entropy_controller": "sac", "entropy_target": 0.2, "entropy_target_ratio": 0.5}, "entropy_target_ratio"),
    ],
)
def test_make_coefficient_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_coefficient(0.01, **kwargs)


def test_make_coefficient_learned_alpha_needs_positive_start():
    with pytest.raises(ValueError, match="entropy_coef"):
        make_coefficient(0.0, entropy_controller="learned_alpha")
