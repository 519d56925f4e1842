"""The config fields our trainers add (``trainers/config.py``): what they build, and errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from llm_entreg.regularizers import ConstantCoefficient, LearnedAlpha, ScheduledCoefficient, TargetEntropyController
from llm_entreg.trainers.config import (BONUS_FIELDS, COEFFICIENT_FIELDS, EntropyRegularizationArguments,
                                        FusedLossArguments)


@dataclass
class _Args(EntropyRegularizationArguments):
    max_steps: int = 10


def test_every_field_the_builders_read_is_a_config_field():
    fields = set(EntropyRegularizationArguments.__dataclass_fields__)
    assert set(COEFFICIENT_FIELDS) <= fields and set(BONUS_FIELDS) <= fields


def test_the_builders_follow_the_fields():
    args = _Args(entropy_coef=0.2, entropy_level="sequence", entropy_loss_agg_mode="seq-mean-token-sum-norm")
    bonus = args.build_entropy_bonus()
    assert (bonus.entropy_coef, bonus.agg_mode) == (0.2, "seq-mean-token-sum-norm")
    assert isinstance(args.build_entropy_coefficient(10), ConstantCoefficient)
    sched = _Args(entropy_coef=1.0, entropy_schedule="linear").build_entropy_coefficient(4)
    assert isinstance(sched, ScheduledCoefficient) and sched.schedule.entropy_schedule_steps == 4  # max_steps
    own = _Args(entropy_coef=1.0, entropy_schedule="linear", entropy_schedule_steps=2).build_entropy_coefficient(4)
    assert own.schedule.entropy_schedule_steps == 2
    ctl = _Args(entropy_controller="target_entropy").build_entropy_coefficient()
    assert isinstance(ctl, TargetEntropyController) and ctl.entropy_target == 0.2  # Skywork-OR1's default
    alpha = _Args(entropy_coef=1e-3, entropy_controller="learned_alpha", entropy_target=0.4).build_entropy_coefficient()
    assert isinstance(alpha, LearnedAlpha) and alpha.target_entropy == 0.4


@pytest.mark.parametrize("fields, name", [
    ({"entropy_coef": -0.1}, "entropy_coef"),
    ({"entropy_level": "batch"}, "entropy_level"),
    ({"entropy_loss_agg_mode": "sum"}, "entropy_loss_agg_mode"),
    ({"entropy_bonus_top_quantile": 1.5}, "entropy_bonus_top_quantile"),
    ({"entropy_schedule": "stairs"}, "entropy_schedule"),
    ({"entropy_schedule": "linear", "max_steps": -1}, "entropy_schedule_steps"),
    ({"entropy_schedule": "linear", "entropy_warmup_steps": 20}, "entropy_warmup_steps"),
    ({"entropy_controller": "pid"}, "entropy_controller"),
    ({"entropy_controller": "target_entropy", "entropy_coef_delta": 0}, "entropy_coef_delta"),
    ({"entropy_controller": "learned_alpha", "entropy_coef": 0.01, "entropy_alpha_lr": -1}, "entropy_alpha_lr"),
    ({"fused_head_backend": "cuda"}, "fused_head_backend"),
])
def test_validation_names_the_config_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        _Args(**fields).validate_entropy_arguments()


def test_fused_loss_chunk_size_is_checked():
    @dataclass
    class _Fused(FusedLossArguments):
        loss_type: str = "dapo"

    with pytest.raises(ValueError, match="^fused_loss_chunk_mib:"):
        _Fused(fused_loss_chunk_mib=0).check_fused_loss_supported()
    _Fused(fused_loss_chunk_mib=64).check_fused_loss_supported()  # fused_loss off: nothing else is read


@pytest.mark.parametrize("config_name", ["EntropyDPOConfig", "EntropySFTConfig", "EntropyGRPOConfig",
                                         "EntropyPPOConfig"])
def test_every_config_with_the_fused_loss_checks_its_chunk_size(config_name, tmp_path):
    import llm_entreg.trainers as trainers

    config_cls = getattr(trainers, config_name)
    with pytest.raises(ValueError, match="^fused_loss_chunk_mib: expected a positive"):
        config_cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], fused_loss_chunk_mib=0)
