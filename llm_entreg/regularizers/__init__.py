"""Pure regularizer math on per-token tensors, and the small stateful controllers of its coefficients.

No trainer knowledge lives here: tensors and plain numbers in, tensors and plain numbers out.

- :mod:`.aggregation` -- ``aggregate`` with the four ``loss_agg_mode``s and global (cross-rank, cross-GA)
  normalizers, ``token_weights`` (the same reduction as per-token weights); ``global_token_and_seq_counts``;
  ``global_mean_loss_scale`` (the factor the caller applies).
- :mod:`.entropy` -- ``EntropyBonus`` (token / sequence / reward level) and its pure functions.
- :mod:`.kl` -- KL-to-reference estimators k1/k2/k3, in the reward or in the loss; KL coefficient controllers.
- :mod:`.schedules` -- coefficient schedules of the optimizer step.
- :mod:`.controllers` -- ``CoefficientSource`` (constant / schedule / target-entropy / learned alpha) and
  ``make_coefficient``.
"""

from .aggregation import (
    LOSS_AGG_MODES,
    LossAggMode,
    aggregate,
    check_loss_agg_mode,
    data_parallel_world_size,
    global_mean_loss_scale,
    global_token_and_seq_counts,
    local_token_and_seq_counts,
    masked_values,
    token_weights,
)
from .controllers import (
    CONTROLLER_ALIASES,
    CONTROLLERS,
    CoefficientSource,
    ConstantCoefficient,
    LearnedAlpha,
    ScheduledCoefficient,
    TargetEntropyController,
    make_coefficient,
)
from .entropy import (
    ENTROPY_LEVELS,
    SEQUENCE_AGG_MODES,
    EntropyBonus,
    EntropyLevel,
    check_entropy_coef,
    entropy_loss_term,
    entropy_quantile_threshold,
    global_entropy_quantile_threshold,
    entropy_reward,
    sampled_entropy_reward,
    top_entropy_mask,
)
from .kl import (
    K3_LOG_RATIO_CLAMP,
    KL_ESTIMATOR_ALIASES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    kl_in_loss,
    kl_in_reward,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    resolve_kl_estimator,
)
from .schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    Schedule,
    make_schedule,
)

__all__ = [
    # aggregation
    "LOSS_AGG_MODES",
    "LossAggMode",
    "aggregate",
    "check_loss_agg_mode",
    "data_parallel_world_size",
    "global_mean_loss_scale",
    "global_token_and_seq_counts",
    "local_token_and_seq_counts",
    "masked_values",
    "token_weights",
    # entropy
    "ENTROPY_LEVELS",
    "SEQUENCE_AGG_MODES",
    "EntropyBonus",
    "EntropyLevel",
    "check_entropy_coef",
    "entropy_loss_term",
    "entropy_quantile_threshold",
    "global_entropy_quantile_threshold",
    "entropy_reward",
    "sampled_entropy_reward",
    "top_entropy_mask",
    # kl
    "K3_LOG_RATIO_CLAMP",
    "KL_ESTIMATORS",
    "KL_ESTIMATOR_ALIASES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "kl_in_loss",
    "kl_in_reward",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "resolve_kl_estimator",
    # schedules
    "SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LinearSchedule",
    "Schedule",
    "make_schedule",
    # controllers
    "CONTROLLERS",
    "CONTROLLER_ALIASES",
    "CoefficientSource",
    "ConstantCoefficient",
    "LearnedAlpha",
    "ScheduledCoefficient",
    "TargetEntropyController",
    "make_coefficient",
]
