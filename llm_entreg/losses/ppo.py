"""PPO's per-token losses: the clipped surrogate (and its loss-fused form), and the clipped value loss.

The math and its literature defaults: docs/formulations.md ("PPO-RLHF") and docs/ppo_rlhf.md.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..regularizers.aggregation import aggregate
from ..regularizers.kl import kl_k1, kl_k3
from .advantages import acc_dtype, check_same_shape, explained_variance, local_mean

Stats = dict[str, torch.Tensor]
#: A per-token loss for :func:`llm_entreg.ops.fused_linear_loss`: ``(logprobs [n], entropy [n], rows [n]) -> [n]``.
TokenLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Bound on ``|log pi - log pi_old|`` before ``exp`` in :func:`clipped_surrogate` (``exp(20) ~ 4.85e8`` is finite
#: in float32); the same bound as :data:`llm_entreg.regularizers.K3_LOG_RATIO_CLAMP`.
LOG_RATIO_CLAMP = 20.0


def check_clip_range(clip_low: float, clip_high: float) -> None:
    """``clip_low`` in ``[0, 1)``, ``clip_high >= 0``; else a ``ValueError`` naming the argument."""
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low: must be in [0, 1), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high: must be >= 0, got {clip_high}")


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate ``max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))`` and ``rho``.

    ``rho = exp(logp - old_logp)`` with the log-ratio clamped to ``±LOG_RATIO_CLAMP``. No masking: the caller
    zeroes padding first (it may hold NaN/inf).
    """
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


def reference_ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> tuple[torch.Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017) with asymmetric clipping ("clip-higher", DAPO, Yu et al. 2025).

    The reference implementation (aggregated, with its statistics) that :func:`ppo_clip_token_loss`, the loss-fused
    form, is tested against; the trainers run TRL's policy loss or the loss-fused form.

    With ``rho_t = exp(logp_t - old_logp_t)``::

        L_t  = max( -A_t * rho_t,  -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high) )
        loss = aggregate(L_t, mask, loss_agg_mode, **agg_kwargs)

    For ``A > 0`` the gain stops once ``rho > 1 + clip_high``; for ``A < 0`` once ``rho < 1 - clip_low``; on the
    other side the unclipped (pessimistic) term stays active. On-policy (``logp == old_logp``) the gradient is
    ``-A_t`` times ``grad logp_t``, normalised by the aggregation.

    Args:
        logp: current policy log-probs of the sampled tokens ``[B, T]`` (differentiable).
        old_logp: rollout-policy log-probs ``[B, T]`` (detached here).
        advantages: ``[B, T]`` (detached here), usually :func:`whiten`-ed :func:`gae` advantages.
        mask: completion mask ``[B, T]``.
        clip_low: ``epsilon_low`` in ``[0, 1)``. Default 0.2 (PPO; TRL ``cliprange``).
        clip_high: ``epsilon_high >= 0``. Default 0.2 (symmetric PPO); DAPO uses 0.28 to leave room for
            low-probability tokens to grow (against entropy collapse).
        loss_agg_mode, agg_kwargs: the reduction, :func:`llm_entreg.regularizers.aggregate` (``global_token_count``,
            ``global_seq_count``, ``max_len``). Use the same for the entropy / KL terms.

    ``logp - old_logp`` is clamped to ``[-20, 20]`` before ``exp`` (no overflow; zero gradient beyond, where
    the ratio is above ``e^20``).

    Returns:
        ``(loss, stats)``. ``stats`` (local masked token means, detached): ``clipfrac`` (fraction of tokens whose
        clipped term is active, i.e. that receive no gradient) = ``clipfrac_low`` (``A < 0``, ``rho <
        1 - clip_low``) + ``clipfrac_high`` (``A > 0``, ``rho > 1 + clip_high``); ``approx_kl`` (k1 estimate of
        ``KL(pi_old || pi)``, mean of ``old_logp - logp``) and ``policy_kl_k3`` (k3: mean of
        ``rho - 1 - log rho``, >= 0) -- both from :mod:`llm_entreg.regularizers.kl`, the tokens being samples
        of ``pi_old``; ``ratio_mean``.
    """
    check_same_shape("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    check_clip_range(clip_low, clip_high)
    acc = acc_dtype(logp, old_logp, advantages)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=logp.device)
    # Padding may hold NaN/inf: zero it *before* the arithmetic so no NaN reaches the gradient.
    lp = torch.where(m, logp.to(acc), zero)
    old = torch.where(m, old_logp.detach().to(acc), zero)
    adv = torch.where(m, advantages.detach().to(acc), zero)

    per_token, ratio = clipped_surrogate(lp, old, adv, clip_low, clip_high)
    loss = aggregate(per_token, mask, loss_agg_mode, **agg_kwargs)

    with torch.no_grad():
        clip_high_active = (adv > 0) & (ratio > 1.0 + clip_high)
        clip_low_active = (adv < 0) & (ratio < 1.0 - clip_low)
        stats = {
            "clipfrac": local_mean((clip_high_active | clip_low_active).to(acc), mask),
            "clipfrac_low": local_mean(clip_low_active.to(acc), mask),
            "clipfrac_high": local_mean(clip_high_active.to(acc), mask),
            "approx_kl": local_mean(kl_k1(old, lp.detach()), mask),
            "policy_kl_k3": local_mean(kl_k3(old, lp.detach()), mask),
            "ratio_mean": local_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss (OpenAI baselines PPO2; TRL's former PPO ``cliprange_value``)::

        V_clip = V_old + clip(V - V_old, -eps, eps)
        L_t    = 0.5 * max( (V_t - R_t)^2, (V_clip_t - R_t)^2 )
        loss   = aggregate(L_t, mask, loss_agg_mode, **agg_kwargs)

    The ``max`` is pessimistic: once ``V`` leaves ``V_old +- eps`` *and* moving it further is what would reduce
    the error, the clipped term dominates and the token gets no gradient. ``clip_range_value=None`` disables
    clipping (``L_t = 0.5 (V_t - R_t)^2``). Default 0.2 (TRL ``cliprange_value``; PPO2 uses the policy clip
    range). The factor 0.5 makes ``dL/dV = V - R``; scale the term with ``vf_coef`` in the trainer.

    Args:
        values: current critic values ``[B, T]`` (differentiable).
        old_values: rollout critic values ``[B, T]`` (detached here).
        returns: value targets ``[B, T]`` from :func:`gae` (detached here).
        mask: completion mask ``[B, T]``.

    Returns:
        ``(loss, stats)``; ``stats`` (local, detached): ``vf_clipfrac`` (fraction of tokens where the clipped
        term is strictly larger, i.e. active), ``explained_variance`` of ``values`` for ``returns``
        (:func:`explained_variance`), ``value_mean``, ``return_mean``.
    """
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    if clip_range_value is not None and not clip_range_value >= 0:
        raise ValueError(f"clip_range_value: must be >= 0 or None, got {clip_range_value}")
    acc = acc_dtype(values, old_values, returns)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=values.device)
    v = torch.where(m, values.to(acc), zero)
    ret = torch.where(m, returns.detach().to(acc), zero)
    unclipped = (v - ret) ** 2
    if clip_range_value is None:
        per_token = 0.5 * unclipped
        clip_active = torch.zeros_like(m)
    else:
        old = torch.where(m, old_values.detach().to(acc), zero)
        v_clip = old + (v - old).clamp(-clip_range_value, clip_range_value)
        clipped = (v_clip - ret) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped.detach() > unclipped.detach()
    loss = aggregate(per_token, mask, loss_agg_mode, **agg_kwargs)
    stats = {
        "vf_clipfrac": local_mean(clip_active.to(acc), mask),
        "explained_variance": explained_variance(v, ret, mask),
        "value_mean": local_mean(v, mask),
        "return_mean": local_mean(ret, mask),
    }
    return loss, stats


def ppo_clip_token_loss(
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor = 1.0,
) -> TokenLossFn:
    """``loss_fn`` for :func:`llm_entreg.ops.fused_linear_loss`: PPO clipped surrogate with a token-level entropy bonus.

    With ``rho_t = exp(lp_t - old_lp_t)`` (log-ratio clamped to ``[-20, 20]``, as in
    :func:`reference_ppo_policy_loss`)::

        L_t = mask_t * ( max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
                         - entropy_coef * H_t ) / normalizer

    i.e. ``-min(rho A, clip(rho) A) - beta H``. ``old_logprobs``, ``advantages``, ``mask`` are ``[N]``, aligned with
    the flattened ``hidden`` rows (detached here). ``mask`` may be a float weight: ``token-mean`` is a 0/1 mask with
    ``normalizer`` = the (global) token count; ``seq-mean-token-mean`` is ``mask = 1 / len(sequence)`` with
    ``normalizer`` = the (global) sequence count. Masked-out tokens (``mask == 0``) contribute exactly 0 even where
    their constants hold NaN/inf padding.
    """
    check_clip_range(clip_low, clip_high)
    shape = tuple(old_logprobs.shape)
    for name, t in (("advantages", advantages), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match old_logprobs {shape}")
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach()
        if bool((normalizer <= 0).any()):
            raise ValueError("normalizer: must be > 0")
    elif not normalizer > 0:
        raise ValueError(f"normalizer: must be > 0, got {normalizer}")
    old_flat = old_logprobs.detach().reshape(-1)
    adv_flat = advantages.detach().reshape(-1)
    mask_flat = mask.detach().reshape(-1)

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dt = logprobs.dtype
        weight = mask_flat[rows].to(dt)
        on = weight != 0
        zero = torch.zeros((), dtype=dt, device=logprobs.device)
        old = torch.where(on, old_flat[rows].to(dt), zero)
        adv = torch.where(on, adv_flat[rows].to(dt), zero)
        lp = torch.where(on, logprobs, zero)
        surrogate, _ = clipped_surrogate(lp, old, adv, clip_low, clip_high)
        per_token = surrogate - entropy_coef * torch.where(on, entropy, zero)
        return per_token * weight / normalizer

    return loss_fn


__all__ = [
    "LOG_RATIO_CLAMP",
    "TokenLossFn",
    "check_clip_range",
    "clipped_surrogate",
    "ppo_clip_token_loss",
    "reference_ppo_policy_loss",
    "value_loss",
]
