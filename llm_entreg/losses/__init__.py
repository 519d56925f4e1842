"""Pure per-token losses and advantages (no trainer knowledge): PPO and GRPO losses, their loss-fused forms,
per-token rewards, GAE and whitening. Conventions: docs/formulations.md ("Conventions of the per-token math").
"""

from .advantages import explained_variance, gae, last_token_index, masked_mean_var, token_rewards, whiten
from .grpo import LOSS_TYPE_AGGREGATION, grpo_fused_token_loss, grpo_loss_weights, grpo_token_loss
from .ppo import (LOG_RATIO_CLAMP, TokenLossFn, check_clip_range, clipped_surrogate, ppo_clip_token_loss,
                  reference_ppo_policy_loss, value_loss)

__all__ = [
    "LOG_RATIO_CLAMP",
    "LOSS_TYPE_AGGREGATION",
    "TokenLossFn",
    "check_clip_range",
    "clipped_surrogate",
    "explained_variance",
    "gae",
    "grpo_fused_token_loss",
    "grpo_loss_weights",
    "grpo_token_loss",
    "last_token_index",
    "masked_mean_var",
    "ppo_clip_token_loss",
    "reference_ppo_policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]
