"""GRPO's per-token loss (TRL's closed form), its normalization per TRL ``loss_type``, and its loss-fused form.

Every ``loss_type`` maps to one of our aggregation modes in :data:`LOSS_TYPE_AGGREGATION`; the per-token weights come
from :func:`llm_entreg.regularizers.token_weights`. Derivation: docs/grpo.md ("The loss-fused path").
"""

from __future__ import annotations

import torch

from ..regularizers.aggregation import token_weights
from .ppo import TokenLossFn

#: TRL's GRPO ``loss_type`` -> the aggregation mode that is its policy-loss normalization. ``grpo``, ``bnpo`` and
#: ``dr_grpo`` normalize by the micro-batch (then divide by the accumulation steps); ``dapo`` by the generation
#: batch's global token count scaled to one micro-batch. These are the loss types the loss-fused path supports.
LOSS_TYPE_AGGREGATION: dict[str, str] = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    delta: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    bias_correction_kl: bool = False,
) -> torch.Tensor:
    """TRL's per-token GRPO/DAPO loss (``loss_type`` grpo, bnpo, dr_grpo, dapo; token-level importance sampling).

    With ``rho = exp(logp - old_logp)`` (not clamped, as in TRL)::

        L_t = -min(min(rho, delta) A, clip(rho, 1 - clip_low, 1 + clip_high) A) + beta KL_t
        KL_t = exp(ref - logp) - (ref - logp) - 1          (k3; times rho when bias_correction_kl)

    ``delta`` (two-sided clipping, None: off) caps only the unclipped ratio; the KL term is added when ``ref_logp``
    is given and ``beta != 0``. Unaggregated and unmasked: the caller applies the loss type's per-token weights.
    This is the closed form the loss-fused path (``fused_loss=True``) differentiates token by token.
    """
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1.0 - clip_low, 1.0 + clip_high)
    capped = coef_1 if delta is None else torch.clamp(coef_1, max=delta)
    loss = -torch.min(capped * advantages, coef_2 * advantages)
    if ref_logp is not None and beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if bias_correction_kl:
            kl = kl * coef_1
        loss = loss + beta * kl
    return loss


def grpo_loss_weights(
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation_steps: int = 1,
    max_completion_length: int | None = None,
    dapo_token_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token weights ``w [B, K]`` with ``(w * L).sum()`` = TRL's GRPO loss of the micro-batch for ``loss_type``.

    ``accumulation_steps``: what TRL divides the grpo/bnpo/dr_grpo loss by (GA in training, 1 in evaluation).
    ``max_completion_length``: dr_grpo's constant divisor. ``dapo_token_count``: dapo's normalizer (the generation
    batch's token count per process, scaled to one micro-batch), which already accounts for accumulation.
    """
    if loss_type not in LOSS_TYPE_AGGREGATION:
        raise ValueError(f"loss_type: expected one of {tuple(LOSS_TYPE_AGGREGATION)}, got {loss_type!r}")
    mode = LOSS_TYPE_AGGREGATION[loss_type]
    mask = mask.float()
    if loss_type == "dapo":
        if dapo_token_count is None:
            raise ValueError("dapo_token_count: required for loss_type='dapo'")
        return token_weights(mask, mode, global_token_count=dapo_token_count)
    kwargs = {"max_len": max_completion_length} if mode == "seq-mean-token-sum-norm" else {}
    return token_weights(mask, mode, **kwargs) / accumulation_steps


def grpo_fused_token_loss(
    mask: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    entropy_weights: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    delta: float | None = None,
    beta: float = 0.0,
    bias_correction_kl: bool = False,
) -> TokenLossFn:
    """``loss_fn`` for :func:`llm_entreg.ops.fused_linear_loss`: ``w_t L_t + e_t H_t`` on the rows it is given.

    Every argument is a flat per-token tensor over the head's rows (``[N]``): ``mask`` (tokens that count),
    ``weights`` (:func:`grpo_loss_weights`), ``advantages``, ``old_logp`` (None: on-policy, the detached current
    log-prob), ``ref_logp`` (None: no KL term), ``entropy_weights`` (``-coef`` times the entropy term's aggregation
    weights and framework scale). ``L_t`` is :func:`grpo_token_loss`. Masked-out tokens contribute exactly 0 even
    where their constants hold padding.
    """

    def loss_fn(lp: torch.Tensor, ent: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        on = mask[rows] != 0
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        lp_on = torch.where(on, lp, zero)
        old = lp_on.detach() if old_logp is None else torch.where(on, old_logp[rows].to(lp.dtype), zero)
        ref = None if ref_logp is None else torch.where(on, ref_logp[rows].to(lp.dtype), zero)
        per_token = grpo_token_loss(lp_on, old, advantages[rows].to(lp.dtype), clip_low, clip_high, delta, ref, beta,
                                    bias_correction_kl)
        per_token = torch.where(on, per_token, zero)
        return per_token * weights[rows].to(lp.dtype) + entropy_weights[rows].to(lp.dtype) * ent

    return loss_fn


__all__ = ["LOSS_TYPE_AGGREGATION", "grpo_fused_token_loss", "grpo_loss_weights", "grpo_token_loss"]
