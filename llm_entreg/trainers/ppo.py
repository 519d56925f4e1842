"""EntropyPPOTrainer: PPO-RLHF on TRL's machinery, a GRPOTrainer subclass with a critic (TRL 1.16 has no PPO trainer).

Generation, rewards, the reference model, PEFT and vLLM come from ``GRPOTrainer``; the rollout adds per-token rewards
(score at the last token, the KL penalty, optionally ``α·H_t``), GAE and whitened advantages; the update adds our
entropy term and the clipped value loss. The pipeline and every coefficient: docs/ppo_rlhf.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as trl_grpo_module

from ..losses import explained_variance, gae, token_rewards, value_loss, whiten
from ..regularizers import AdaptiveKLController, FixedKLController, kl_penalty
from .config import EntropyRegularizationArguments, FusedLossArguments, RunArguments
from .critic import Critic, CriticStepCallback, value_head_from_policy
from .fused_policy import FusedPolicyLossMixin
from .grpo import CapturedEntropiesMixin
from .mixin import EntropyRegularizationMixin
from .policy_loss import OwnPolicyLossMixin, PolicyLossArguments


@dataclass
class EntropyPPOConfig(FusedLossArguments, PolicyLossArguments, EntropyRegularizationArguments, RunArguments,
                       GRPOConfig):
    """``trl.GRPOConfig`` (generation, rewards, clipping, epochs) plus the critic, the KL penalty and our entropy
    fields.

    PPO-specific fields (literature defaults in brackets):
        vf_coef: weight of the value loss [0.1 in TRL's former PPOTrainer; 0.5 in classic PPO].
        cliprange_value: value clipping ε_v around the rollout values [0.2]; ``None`` turns it off.
        gamma, lam: GAE discount and λ [1.0, 0.95 for RLHF].
        whiten_advantages: whiten the GAE advantages over the rollout batch (all ranks) [True].
        kl_coef: KL-to-reference coefficient [0.05]; ``kl_in="reward"`` subtracts ``kl_coef·KL_t`` from every
            token's reward (classic RLHF), ``kl_in="loss"`` uses TRL's k3 term in the loss with ``beta = kl_coef``.
        kl_estimator: per-token KL in the reward: ``k1`` (log-ratio, classic) or ``k3`` [k1].
        target_kl: adaptive KL controller target (Ziegler et al.) [None = fixed coefficient; 6.0 in the paper].
        kl_horizon: adaptive controller horizon [10000].
        vf_learning_rate: critic learning rate [None = learning_rate].
    ``num_iterations`` is the number of PPO epochs over one rollout batch [classic 4] and ``steps_per_generation``
    the number of mini-batches; ``num_generations`` (>= 2, a TRL requirement) is samples per prompt — the critic,
    not the group, is the baseline. ``beta`` is set from ``kl_coef``; do not set it.
    """

    vf_coef: float = field(default=0.1, metadata={"help": "Value-loss weight (TRL's old PPO: 0.1; classic: 0.5)."})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "Value clipping range; None disables."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ (RLHF: 1.0)."})
    lam: float = field(default=0.95, metadata={"help": "GAE λ (RLHF: 0.95)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the rollout batch."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL-to-reference coefficient (0.05)."})
    kl_in: str = field(default="reward", metadata={"help": "'reward' (classic RLHF) or 'loss' (TRL's k3 term)."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator in the reward: k1 or k3."})
    target_kl: float | None = field(default=None, metadata={"help": "Adaptive KL target (None: fixed kl_coef)."})
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive KL controller horizon."})
    vf_learning_rate: float | None = field(default=None, metadata={"help": "Critic learning rate (None: lr)."})
    loss_type: str = field(default="dapo", metadata={"help": "TRL policy-loss aggregation (dapo = token mean)."})
    beta: float = field(default=0.0, metadata={"help": "Set from kl_coef; do not set."})

    def __post_init__(self):
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"kl_in: expected 'reward' or 'loss', got {self.kl_in!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef}")
        if self.beta not in (0.0, self.kl_coef):
            raise ValueError("beta: set kl_coef (and kl_in) instead; EntropyPPOConfig derives TRL's beta from them")
        if self.target_kl is not None and (self.target_kl <= 0 or self.kl_coef <= 0):
            raise ValueError("target_kl: the adaptive KL controller needs target_kl > 0 and kl_coef > 0")
        if self.vf_coef < 0:
            raise ValueError(f"vf_coef: must be >= 0, got {self.vf_coef}")
        if not (0 <= self.lam <= 1 and 0 <= self.gamma <= 1):
            raise ValueError(f"lam: gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        # TRL computes reference log-probs (and builds the reference model) only when beta != 0
        self.beta = self.kl_coef
        if getattr(self, "use_adaptive_entropy", False):
            raise ValueError("use_adaptive_entropy: set entropy_controller='target_entropy' instead")
        super().__post_init__()
        self.validate_entropy_arguments()
        self.check_fused_loss_supported()
        self.check_policy_loss_arguments()


class EntropyPPOTrainer(EntropyRegularizationMixin, CapturedEntropiesMixin, OwnPolicyLossMixin, FusedPolicyLossMixin,
                        GRPOTrainer):
    """PPO-RLHF with a critic, the KL penalty in the reward (or loss) and our entropy regularizers.

    Same constructor as ``trl.GRPOTrainer`` plus ``value_model`` (``None``: a value head on a copy of the policy's
    backbone; or a model returning one value per token). ``reward_funcs`` may be reward functions and/or a
    sequence-classification reward model (TRL re-tokenizes completions for a reward model with its own tokenizer).
    """

    _name = "EntropyPPO"
    _trainer_divides_loss_by_ga = False
    _counts_from_batch_samples = False

    def __init__(self, *args, value_model=None, **kwargs):
        config = kwargs.get("args")
        if config is None or not isinstance(config, EntropyPPOConfig):
            raise ValueError(f"args: expected an EntropyPPOConfig, got {type(config).__name__}")
        with self._our_fused_head(trl_grpo_module, config, capture_outputs=False):
            super().__init__(*args, **kwargs)
        self._entropy_bonus_enabled = False  # TRL's own bonus stays off: ours is the single source
        self.use_adaptive_entropy = False
        self._entropy_setup()
        if value_model is None:
            value_model = value_head_from_policy(self.accelerator.unwrap_model(self.model))
        self.critic = Critic(value_model, self.accelerator, lr=config.vf_learning_rate or config.learning_rate,
                             weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
        self.add_callback(CriticStepCallback(self.critic))
        self.kl_controller = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
            if config.target_kl is not None
            else FixedKLController(config.kl_coef)
        )
        self._ppo_rewards_per_func = None
        self._ppo_stats: dict[str, torch.Tensor] = {}

    def _entropy_mask(self, inputs) -> torch.Tensor:
        return self._completion_loss_mask(inputs)

    # ------------------------------------------------------------------ rollout
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ppo_rewards_per_func = rewards_per_func  # gathered over all processes, as TRL returns it
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        rpf = self._ppo_rewards_per_func
        scores = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        n_local = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * n_local
        scores = scores[start : start + n_local].to(device)
        # A completion every reward function declined (all None) carries no signal: as in TRL, no advantage
        unscorable = torch.isnan(rpf).all(dim=1)[start : start + n_local].to(device)

        prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        n_completion = completion_ids.shape[1]
        mask = self._completion_loss_mask(out)
        with torch.no_grad():
            need_entropy = self.entropy_bonus.entropy_level == "reward"
            old_logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, n_completion, compute_entropy=need_entropy
            )
            values = self.critic.values(input_ids, attention_mask)[:, -n_completion - 1 : -1]
            values = values.float().masked_fill(~mask, 0.0)
        if "old_per_token_logps" in out and out["old_per_token_logps"] is not None:
            old_logps = out["old_per_token_logps"]
        kl = None
        if out.get("ref_per_token_logps") is not None:
            kl = kl_penalty(old_logps.float(), out["ref_per_token_logps"].float(), self.args.kl_estimator)
            kl = kl.masked_fill(~mask, 0.0)
        kl_coef = self.kl_controller.value
        reward_bonus = None
        if need_entropy:
            reward_bonus = self.entropy_bonus.reward_term(entropies.float(), mask, self.entropy_coefficient.value)
        rewards = token_rewards(
            scores, mask, kl_per_token=kl if self.args.kl_in == "reward" else None,
            kl_coef=kl_coef if self.args.kl_in == "reward" else 0.0, entropy_bonus=reward_bonus,
        )
        advantages, returns = gae(rewards, values, mask, gamma=self.args.gamma, lam=self.args.lam)
        if self.args.whiten_advantages:
            advantages = whiten(advantages, mask, distributed=True)
        advantages = advantages.masked_fill(unscorable.unsqueeze(1), 0.0)
        out["advantages"] = advantages
        out["old_values"] = values
        out["returns"] = returns
        out["old_per_token_logps"] = old_logps
        # Rollout statistics (global means) and, once per rollout, the adaptive KL controller's update
        totals = [scores.sum(), torch.tensor(float(n_local), device=device)]
        if kl is not None:
            totals += [kl.sum(), mask.sum().float()]
        totals = self.accelerator.reduce(torch.stack([t.float() for t in totals]), reduction="sum")
        metrics = self._metrics[mode]
        metrics["score"].append((totals[0] / totals[1]).item())
        metrics["kl_coef"].append(float(kl_coef))
        if kl is not None:
            # With the KL in the loss, TRL logs its own "kl" (k3 on the update); ours is the rollout's estimate
            key = "kl" if self.args.kl_in == "reward" else "kl_rollout"
            metrics[key].append((totals[2] / totals[3].clamp(min=1)).item())
            if mode == "train":
                # Ziegler et al.: the controller sees the per-sequence KL (sum over tokens), batch mean
                self.kl_controller.update((totals[2] / totals[1]).item(), int(totals[1].item()))
        return out

    # ------------------------------------------------------------------ update
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask = self._completion_loss_mask(inputs)
        if mode == "train":
            self._generation_window_counts(inputs, mask)
        kl_in_loss = self.args.kl_in == "loss"
        saved_beta = self.beta
        self.beta = self.kl_controller.value if kl_in_loss else 0.0  # TRL's k3 term only when the KL is in the loss
        try:
            if self.args.fused_loss:  # policy loss + KL + entropy term, gradient formed in the head's forward
                loss, logps, entropy = self._fused_policy_loss(model, inputs, mask, mode)
            elif self.args.uses_own_policy_loss():  # Clip-Cov / KL-Cov / entropy-shaped advantages
                loss, logps, entropy = self._own_policy_loss(model, inputs, mask, mode)
            else:
                loss, logps, entropy = self._trl_loss_with_entropies(model, inputs, mask)
        finally:
            self.beta = saved_beta
        if not self.args.fused_loss:
            loss = self._entropy_applied(loss, entropy, mask, mode)

        prompt_completion = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        n_completion = inputs["completion_ids"].shape[1]
        values = self.critic.values(prompt_completion, attention)[:, -n_completion - 1 : -1].float()
        agg_kwargs, scale = self._global_aggregation(mode, values.device)
        old_values, returns = inputs["old_values"], inputs["returns"]
        v_loss, v_stats = value_loss(values, old_values, returns, mask, self.args.cliprange_value, **agg_kwargs)
        loss = loss + self.args.vf_coef * v_loss * scale
        with torch.no_grad():
            local_v_loss, _ = value_loss(values.detach(), old_values, returns, mask, self.args.cliprange_value)
            log_ratio = (logps.detach() - inputs["old_per_token_logps"]).masked_fill(~mask, 0.0)
            stats = torch.stack([
                local_v_loss.float(),
                v_stats["vf_clipfrac"].float(),
                explained_variance(values.detach(), inputs["returns"], mask).float(),
                (-log_ratio).sum() / mask.sum().clamp(min=1),  # approx KL(old || new), k1
            ])
            stats = self.accelerator.reduce(stats, reduction="mean")
        for name, value in zip(("value_loss", "vf_clipfrac", "explained_variance", "approx_kl"), stats.tolist()):
            self._metrics[mode][name].append(value)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        self.critic.save(folder, {"kl_controller": self.kl_controller.state_dict()})

    def _entropy_load_state(self, checkpoint: str) -> None:
        super()._entropy_load_state(checkpoint)
        state = self.critic.load(checkpoint)
        try:
            self.kl_controller.load_state_dict(state["kl_controller"])
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{checkpoint}: corrupt or incompatible KL-controller state ({exc})") from exc
