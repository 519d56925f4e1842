"""EntropyRLOOTrainer: TRL's RLOO (REINFORCE with a leave-one-out baseline) with our entropy regularizers.

TRL's RLOOTrainer puts a k1 KL into the reward (``beta``) and only logs the entropy. Here the entropy term is added
at the token or sequence level in the loss (the per-token entropies TRL's fused-head call returns are captured, with
their graph), or at the reward level (``α · Σ_t H_t`` per completion, before the leave-one-out baseline), with every
schedule and controller. With ``entropy_coef = 0`` the loss is TRL's. Math: docs/formulations.md ("RLOO").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import RLOOConfig, RLOOTrainer
from trl.trainer import rloo_trainer as trl_rloo_module

from .config import EntropyRegularizationArguments, RunArguments
from .grpo import CapturedEntropiesMixin, EntropyReward, with_entropy_reward
from .mixin import EntropyRegularizationMixin


@dataclass
class EntropyRLOOConfig(EntropyRegularizationArguments, RunArguments, RLOOConfig):
    """``trl.RLOOConfig`` plus the entropy fields (see :class:`EntropyRegularizationArguments`). ``beta`` keeps TRL's
    meaning: the k1 KL-to-reference in the reward."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_entropy_arguments()


class EntropyRLOOTrainer(EntropyRegularizationMixin, CapturedEntropiesMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with our entropy term. Same constructor; ``args`` must be an :class:`EntropyRLOOConfig`.

    Logs TRL's metrics (``entropy``, ``kl``, clip ratios, rewards) plus ``entropy_coef`` and ``entropy_bonus``.
    """

    _name = "EntropyRLOO"
    _trainer_divides_loss_by_ga = True  # TRL's RLOO returns an unscaled loss; the HF Trainer divides it by GA
    _counts_from_batch_samples = False  # the batch is generated: counts come from the generation batch

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None or not isinstance(config, EntropyRLOOConfig):
            raise ValueError(f"args: expected an EntropyRLOOConfig, got {type(config).__name__}")
        self._entropy_reward = None
        if config.entropy_level == "reward":
            self._entropy_reward = EntropyReward(RLOOTrainer)
            args, kwargs = with_entropy_reward(self._entropy_reward, config, args, kwargs)
        with self._our_fused_head(trl_rloo_module, config, capture_outputs=False):
            super().__init__(*args, **kwargs)
        if self._entropy_reward is not None:
            self._entropy_reward.trainer = self
        self._entropy_setup()

    def _entropy_mask(self, inputs) -> torch.Tensor:
        return self._completion_loss_mask(inputs)

    def _generate_and_score_completions(self, inputs):
        """TRL's generation batch, plus its completion-token count over every rank (the global normalizer)."""
        output = super()._generate_and_score_completions(inputs)
        tokens = self._completion_loss_mask(output).sum().float().reshape(1)
        output["num_items_in_batch"] = self.accelerator.reduce(tokens, reduction="sum").squeeze(0)
        return output

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask = self._entropy_mask(inputs)
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        loss, _, entropy = self._trl_loss_with_entropies(model, inputs, mask)
        return self._entropy_applied(loss, entropy, mask, mode)
