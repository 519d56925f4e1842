"""EntropyGRPOTrainer: TRL's GRPO with our entropy regularizers as the single source of the entropy term.

TRL's GRPOTrainer has an entropy bonus of its own (``entropy_coef``, ``use_adaptive_entropy``). Here the same field
names feed our regularizers instead (token or sequence level, schedules, target-entropy controller, learned α,
global aggregation), and TRL's own bonus is switched off, so the term is applied exactly once. The KL-to-reference
penalty stays TRL's (``beta``, k3 in the loss). Only ``_compute_loss`` is wrapped: the per-token entropies that
TRL's fused-head call already returns (with their graph) are captured, and ``-β · agg(H)`` is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as trl_grpo_module

from .config import EntropyRegularizationArguments, FusedLossArguments, RunArguments
from .fused_policy import FusedPolicyLossMixin
from .mixin import EntropyRegularizationMixin
from .policy_loss import OwnPolicyLossMixin, PolicyLossArguments


@dataclass
class EntropyGRPOConfig(FusedLossArguments, PolicyLossArguments, EntropyRegularizationArguments, RunArguments,
                        GRPOConfig):
    """``trl.GRPOConfig`` whose entropy fields are ours (see :class:`EntropyRegularizationArguments`).

    ``entropy_coef``, ``entropy_target``, ``entropy_coef_min/max/delta`` keep TRL's names but drive our
    regularizers; TRL's ``use_adaptive_entropy`` is replaced by ``entropy_controller="target_entropy"``.
    ``top_entropy_quantile`` keeps TRL's meaning (which tokens the *policy* loss uses, "80/20"); the bonus has its
    own ``entropy_bonus_top_quantile``. ``entropy_level="reward"`` adds ``α · Σ_t H_t`` of each completion to its
    reward before the group normalization (:class:`EntropyReward`).
    """

    use_adaptive_entropy: bool = field(
        default=False,
        metadata={"help": "Not used: set entropy_controller='target_entropy' (Skywork-OR1) instead."},
    )

    def __post_init__(self):
        if self.use_adaptive_entropy:
            raise ValueError(
                "use_adaptive_entropy: TRL's own controller is replaced here; set entropy_controller='target_entropy' "
                "(same entropy_target / entropy_coef_delta / entropy_coef_min / entropy_coef_max fields)"
            )
        super().__post_init__()
        self.validate_entropy_arguments()
        self.check_fused_loss_supported()
        self.check_policy_loss_arguments()


class EntropyReward:
    """Entropy in the reward for GRPO: ``α · Σ_t H_t`` of each sampled completion under the current policy.

    Registered as one more reward function (weight 1, logged as ``rewards/entropy_reward/*``), so it enters the
    sequence reward before TRL's group normalization — GRPO's advantages are per sequence, hence the per-sequence
    sum of per-token entropies (the chain-rule estimate of the sequence entropy). α is read at call time, so
    schedules and controllers apply. Costs one no-grad forward of the policy over the completions.
    """

    __name__ = "entropy_reward"

    def __init__(self, base=GRPOTrainer):
        self.trainer = None
        self.base = base  # the TRL class whose log-prob pass is used (not ours, which captures for the bonus)

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        trainer = self.trainer
        device = trainer.accelerator.device
        pad = trainer.processing_class.pad_token_id if hasattr(trainer.processing_class, "pad_token_id") else 0
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        p_len = max(len(p) for p in prompt_ids)
        c_len = max(1, max(len(c) for c in completion_ids))
        ids = torch.full((len(prompt_ids), p_len + c_len), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):  # prompts left-padded, completions right
            ids[row, p_len - len(p) : p_len] = torch.as_tensor(list(p))
            ids[row, p_len : p_len + len(c)] = torch.as_tensor(list(c))
            attention[row, p_len - len(p) : p_len + len(c)] = 1
        _, entropy, _ = self.base._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids.to(device), attention.to(device), c_len, compute_entropy=True
        )
        mask = attention[:, p_len:].to(device).bool()
        alpha = trainer.entropy_coefficient.value
        return (alpha * (entropy.float() * mask).sum(-1)).tolist()


def with_entropy_reward(reward: EntropyReward, config, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The trainer's arguments with ``reward`` appended to its reward functions (weight 1)."""
    positional = "reward_funcs" not in kwargs and len(args) > 1
    funcs = args[1] if positional else kwargs.get("reward_funcs")
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
    if config.reward_weights is not None:
        config.reward_weights = list(config.reward_weights) + [1.0]
    funcs = funcs + [reward]
    if positional:
        return (args[0], funcs, *args[2:]), kwargs
    return args, {**kwargs, "reward_funcs": funcs}


class CapturedEntropiesMixin:
    """TRL's per-token log-prob pass of a generated batch: its log-probs and entropies (with their graph) kept while
    the loss is computed (GRPO, RLOO, PPO)."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._entropy_capturing and entropies is not None:
            self._entropy_captured.append((logps, entropies))
        return logps, entropies, aux

    def _trl_loss_with_entropies(self, model, inputs, mask):
        """``(TRL's own loss of the batch, the log-probs and entropies its log-prob pass computed)``, checked
        finite."""
        with self._entropy_capture_window() as captured:
            loss = super()._compute_loss(model, inputs)
        if not captured:  # pragma: no cover - would mean TRL stopped computing entropies in its loss
            raise RuntimeError(f"{type(self).__name__}: TRL's _compute_loss computed no entropies; cannot apply the "
                               "entropy term")
        logps, entropy = captured[0]
        captured.clear()
        self._entropy_check_finite(loss, entropy, mask)
        return loss, logps, entropy


class EntropyGRPOTrainer(EntropyRegularizationMixin, CapturedEntropiesMixin, OwnPolicyLossMixin, FusedPolicyLossMixin,
                         GRPOTrainer):
    """``trl.GRPOTrainer`` with our entropy bonus. Same constructor; ``args`` must be an :class:`EntropyGRPOConfig`.

    Logs TRL's metrics (``entropy``, ``kl``, clip ratios, rewards) plus ``entropy_coef`` and ``entropy_bonus``.
    """

    _name = "EntropyGRPO"
    # TRL's GRPO loss is already scaled for gradient accumulation (`loss_is_scaled_for_ga = True`)
    _trainer_divides_loss_by_ga = False
    # The batch is generated after the data loader: counts come from the generation batch (see _compute_loss)
    _counts_from_batch_samples = False

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None or not isinstance(config, EntropyGRPOConfig):
            raise ValueError(f"args: expected an EntropyGRPOConfig, got {type(config).__name__}")
        # The entropies are captured from `_get_per_token_logps_and_entropies` (already cut to the completion)
        self._entropy_reward = None
        if config.entropy_level == "reward":
            self._entropy_reward = EntropyReward(GRPOTrainer)
            args, kwargs = with_entropy_reward(self._entropy_reward, config, args, kwargs)
        with self._our_fused_head(trl_grpo_module, config, capture_outputs=False):
            super().__init__(*args, **kwargs)
        if self._entropy_reward is not None:
            self._entropy_reward.trainer = self
        # TRL's own entropy bonus must not apply a second time: ours is the single source of the term
        self._entropy_bonus_enabled = False
        self.use_adaptive_entropy = False
        self._entropy_setup()

    def _entropy_mask(self, inputs) -> torch.Tensor:
        return self._completion_loss_mask(inputs)

    def _compute_loss(self, model, inputs):
        if self.args.fused_loss:
            return self._fused_compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        mask = self._entropy_mask(inputs)
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        if self.args.uses_own_policy_loss():  # Clip-Cov / KL-Cov / entropy-shaped advantages
            loss, _, entropy = self._own_policy_loss(model, inputs, mask, mode)
        else:
            loss, _, entropy = self._trl_loss_with_entropies(model, inputs, mask)
        return self._entropy_applied(loss, entropy, mask, mode)

    # ------------------------------------------------------------------ the loss-fused path (fused_loss=True)
    def _fused_compute_loss(self, model, inputs):
        """TRL's GRPO loss + our entropy term, with the gradient formed inside the LM head's forward."""
        mask = self._completion_loss_mask(inputs)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        loss, _, _ = self._fused_policy_loss(model, inputs, mask, mode)
        return loss
