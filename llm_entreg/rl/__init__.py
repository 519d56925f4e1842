"""Pure RL math on per-token tensors (no trainer knowledge): PPO-RLHF rewards, GAE, whitening, clipped losses.

- :mod:`.ppo` -- ``token_rewards``, ``gae``, ``whiten`` / ``masked_mean_var`` (optionally across ranks),
  ``ppo_policy_loss`` (clip-higher), ``grpo_token_loss`` (TRL's per-token GRPO loss), ``value_loss`` (clipped),
  ``explained_variance``, ``last_token_index``.
"""

from .ppo import (
    LOG_RATIO_CLAMP,
    explained_variance,
    gae,
    grpo_token_loss,
    last_token_index,
    masked_mean_var,
    ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

__all__ = [
    "LOG_RATIO_CLAMP",
    "explained_variance",
    "gae",
    "grpo_token_loss",
    "last_token_index",
    "masked_mean_var",
    "ppo_policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]
