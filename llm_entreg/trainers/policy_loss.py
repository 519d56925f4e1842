"""The covariance-based policy losses (Clip-Cov, KL-Cov) and entropy-shaped advantages for GRPO and PPO: their
config fields and the policy-loss path that computes TRL's per-token GRPO loss itself so these can change it.

The covariance's means, KL-Cov's top fraction and Clip-Cov's random subset are taken over every rank's tokens of
the micro-batch, so ``n`` processes select what one process selects on the same global batch. Math:
docs/formulations.md ("More entropy methods").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..losses import grpo_loss_weights, grpo_token_loss
from ..losses.covariance import (clip_cov_token_loss, clipped_by_ppo, kl_cov_token_loss, shaped_advantages,
                                 token_covariance, token_keys)
from .config import check_own_policy_loss_supported

POLICY_LOSS_MODES = ("vanilla", "clip_cov", "kl_cov")


@dataclass
class PolicyLossArguments:
    """Fields of the GRPO and PPO configs that change the policy loss (verl's names where verl has them)."""

    policy_loss_mode: str = field(
        default="vanilla",
        metadata={"help": "Policy loss: 'vanilla' (TRL's clipped surrogate), 'clip_cov' or 'kl_cov' (Cui et al., "
                  "arXiv 2505.22617: restrict the update on the tokens whose log-prob and advantage covary most)."},
    )
    clip_cov_ratio: float = field(
        default=2e-4, metadata={"help": "clip_cov: fraction of all tokens whose gradient is cut. Paper: 2e-4; (0, 1]."}
    )
    clip_cov_lb: float = field(default=1.0, metadata={"help": "clip_cov: lower covariance bound. Paper: 1."})
    clip_cov_ub: float = field(default=5.0, metadata={"help": "clip_cov: upper covariance bound. Paper: 5."})
    kl_cov_ratio: float = field(
        default=2e-3,
        metadata={"help": "kl_cov: fraction of tokens (largest covariance) that get the KL penalty. Paper: 2e-3 "
                  "(7B) or 2e-4; (0, 1]."},
    )
    ppo_kl_coef: float = field(
        default=1.0, metadata={"help": "kl_cov: weight of |log π - log π_old| on the selected tokens. Paper: 1."}
    )
    entropy_advantage_coef: float = field(
        default=0.0,
        metadata={"help": "Entropy-shaped advantages (Cheng et al., arXiv 2506.14758): A + min(α·sg(H), |A|/κ); "
                  "this is α. Default 0.0 (off); paper: 0.4; >= 0."},
    )
    entropy_advantage_clip: float = field(
        default=2.0, metadata={"help": "Entropy-shaped advantages: κ, the term is at most |A|/κ. Paper: 2; > 1."}
    )

    def check_policy_loss_arguments(self) -> None:
        """Raise ``ValueError`` naming the first invalid policy-loss field."""
        if self.policy_loss_mode not in POLICY_LOSS_MODES:
            raise ValueError(f"policy_loss_mode: expected one of {POLICY_LOSS_MODES}, got {self.policy_loss_mode!r}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a fraction in (0, 1], got {getattr(self, name)!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb: must be below clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        if self.ppo_kl_coef < 0:
            raise ValueError(f"ppo_kl_coef: must be >= 0, got {self.ppo_kl_coef}")
        if self.entropy_advantage_coef < 0:
            raise ValueError(f"entropy_advantage_coef: must be >= 0, got {self.entropy_advantage_coef}")
        if not self.entropy_advantage_clip > 1.0:
            raise ValueError(f"entropy_advantage_clip: must be > 1 (so the term cannot flip an advantage's sign), "
                             f"got {self.entropy_advantage_clip}")
        if not self.uses_own_policy_loss():
            return
        feature = (f"policy_loss_mode={self.policy_loss_mode!r}" if self.policy_loss_mode != "vanilla"
                   else "entropy_advantage_coef > 0")
        if getattr(self, "fused_loss", False):
            raise ValueError(f"fused_loss: not with {feature} (the loss-fused head forms TRL's plain surrogate)")
        check_own_policy_loss_supported(self, feature, "these methods change TRL's token-level GRPO loss")

    def uses_own_policy_loss(self) -> bool:
        return self.policy_loss_mode != "vanilla" or self.entropy_advantage_coef > 0


class OwnPolicyLossMixin:
    """Mix into a GRPOTrainer subclass after :class:`EntropyRegularizationMixin`, before ``FusedPolicyLossMixin``."""

    def _own_policy_loss(self, model, inputs: dict[str, Any], mask: torch.Tensor, mode: str):
        """``(loss, logps, entropies)``: TRL's GRPO policy loss (with ``self.beta``'s k3 KL) computed per token here,
        with the covariance mode and the entropy-shaped advantages applied; TRL logs its usual metrics."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        k = completion_ids.shape[1]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, k,
                                                                      compute_entropy=True)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        adv = inputs["advantages"]
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand_as(logps).float()
        args = self.args
        if args.entropy_advantage_coef > 0:
            shaped = shaped_advantages(adv, entropies, args.entropy_advantage_coef, args.entropy_advantage_clip)
            self._log_mean(mode, "entropy_advantage/mean_shift", (shaped - adv)[mask])
            adv = shaped
        per_token = self._policy_token_loss(logps, old, adv, ref, mask, mode, input_ids, attention_mask, k)
        weights = grpo_loss_weights(mask, self.loss_type, accumulation_steps=self._loss_accumulation(mode),
                                    max_completion_length=self.max_completion_length,
                                    dapo_token_count=self._dapo_token_count(inputs, mode))
        loss = (weights * per_token).sum()
        self._entropy_check_finite(loss, entropies.detach(), mask)
        self._log_policy_metrics(model, inputs, logps.detach(), entropies.detach())
        return loss, logps, entropies

    def _policy_token_loss(self, logps, old, adv, ref, mask, mode, input_ids, attention_mask, k) -> torch.Tensor:
        args = self.args
        kl_args = dict(ref_logp=ref, beta=self.beta, bias_correction_kl=args.use_bias_correction_kl)
        if args.policy_loss_mode == "vanilla":
            return grpo_token_loss(logps, old, adv, self.epsilon_low, self.epsilon_high, args.delta, **kl_args)
        kl = grpo_token_loss(logps, old, torch.zeros_like(adv), self.epsilon_low, self.epsilon_high,
                             **kl_args)  # the KL term alone
        cov, n_tokens = self._global_covariance(logps, adv, mask)
        if args.policy_loss_mode == "kl_cov":
            selected = self._global_top(cov, mask, _selection_size(n_tokens, args.kl_cov_ratio))
            self._log_mean(mode, "kl_cov/selected_frac", selected[mask].float())
            return kl_cov_token_loss(logps, old, adv, selected, args.ppo_kl_coef) + kl
        candidates = mask & ~clipped_by_ppo(logps, old, adv, self.epsilon_low, self.epsilon_high)
        candidates &= (cov > args.clip_cov_lb) & (cov < args.clip_cov_ub)
        keys = token_keys(input_ids, attention_mask, k, self.state.global_step).to(cov.device)
        selected = self._global_smallest(keys, candidates, _selection_size(n_tokens, args.clip_cov_ratio))
        self._log_mean(mode, "clip_cov/selected_frac", selected[mask].float())
        return clip_cov_token_loss(logps, old, adv, selected, self.epsilon_low, self.epsilon_high, args.delta) + kl

    # ------------------------------------------------------------------ statistics over every rank's tokens
    def _sum_all(self, *values: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([v.double() for v in values]).to(self.accelerator.device)
        return self.accelerator.reduce(stacked, reduction="sum") if self.accelerator.num_processes > 1 else stacked

    def _gather_all(self, values: torch.Tensor) -> torch.Tensor:
        """A 1-D tensor of every rank's ``values`` (of any length)."""
        values = values.double().to(self.accelerator.device)
        if self.accelerator.num_processes == 1:
            return values
        padded = self.accelerator.pad_across_processes(values, dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered)]

    def _global_covariance(self, logps, adv, mask) -> tuple[torch.Tensor, float]:
        """(each token's covariance term about every rank's means, every rank's token count)."""
        m = mask.float()
        s_lp, s_adv, n_all = self._sum_all((logps.detach() * m).sum(), (adv * m).sum(), m.sum())
        n = n_all.clamp(min=1)
        cov = token_covariance(logps.double(), adv.double(), (s_lp / n).to(logps.device), (s_adv / n).to(logps.device))
        return torch.where(mask, cov, torch.zeros_like(cov)), n_all.item()

    def _global_top(self, cov, mask, n_select: int) -> torch.Tensor:
        """Tokens whose covariance is among the ``n_select`` largest of every rank's (ties at the cut all in)."""
        values = self._gather_all(cov[mask])
        if values.numel() == 0:
            return torch.zeros_like(mask)
        cut = values.topk(min(n_select, values.numel())).values[-1].to(cov.device)
        return mask & (cov >= cut)

    def _global_smallest(self, keys, candidates, n_select: int) -> torch.Tensor:
        """``n_select`` tokens, drawn among ``candidates`` by smallest key over every rank."""
        values = self._gather_all(keys[candidates])
        if values.numel() <= n_select:
            return candidates
        cut = values.kthvalue(n_select).values.to(keys.device)
        return candidates & (keys <= cut)

    def _log_mean(self, mode: str, name: str, values: torch.Tensor) -> None:
        total, n = self._sum_all(values.sum(), torch.tensor(float(values.numel()), device=values.device))
        self._metrics[mode][name].append((total / n.clamp(min=1)).item())


def _selection_size(n_tokens: float, ratio: float) -> int:
    """How many of ``n_tokens`` tokens a covariance mode selects at ``ratio``: at least one."""
    return max(int(ratio * n_tokens), 1)
