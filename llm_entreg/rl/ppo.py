"""The pure math of PPO-RLHF on per-token tensors ``[B, T]``: rewards, GAE, whitening, clipped losses.

No trainer, model or config knowledge lives here: tensors and plain numbers in, tensors out.

Shapes and conventions (every function)
---------------------------------------
- Every per-token tensor is ``[B, T]`` over the *completion* tokens (the prompt is not part of it). Token ``t``
  of row ``b`` is the ``t``-th generated token; ``logp[b, t]`` is ``log pi(y_t | x, y_<t)``, and
  ``values[b, t]`` is ``V(s_t)`` -- the critic's value of the state *before* emitting token ``t``, i.e. read
  from the same position whose logits give ``logp[b, t]`` (shifted exactly like the logits).
- ``mask [B, T]`` (bool or 0/1) is 1 on real completion tokens -- the EOS token included if it was generated --
  and 0 on padding after EOS (early EOS), on truncation padding, and everywhere on an empty row. Completions
  are normally left-aligned with right padding and variable lengths, but no function assumes it: the "last
  real token" is found from the mask, and a masked-out position in the middle is *skipped* (it is not a time
  step; see :func:`gae`).
- Values at masked-out positions are never read: padding may hold NaN/inf. Outputs are exactly 0 there.
- No function returns NaN for an all-zero mask or a single token. Arithmetic runs in
  ``promote_types(dtype, float32)``: float64 in gives float64 out, bf16/fp16 in gives float32 out.
- Reductions of the *losses* go through :func:`llm_entreg.regularizers.aggregate` (``loss_agg_mode`` and its
  global token / sequence normalizers, passed as ``**agg_kwargs``). The *stats* dicts are local masked token
  means of this micro-batch (0-dim detached tensors; nothing is read back to the host, so no device sync).

The pieces of one PPO-RLHF step, in order (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022):

1. rollout: ``logp_old``, ``ref_logp``, ``values_old``, the sequence score of the reward model, the mask;
2. :func:`token_rewards` -- ``r_t = -kl_coef * KL_t (+ alpha * H_t) + score * 1[t = last real token]``, with
   ``KL_t`` from :func:`llm_entreg.regularizers.kl_penalty` (k1 classic) and the entropy reward from
   :func:`llm_entreg.regularizers.entropy_reward` / ``sampled_entropy_reward``;
3. :func:`gae` -- advantages and returns (``gamma = 1``, ``lam = 0.95``);
4. :func:`whiten` the advantages (per batch, optionally across ranks);
5. for each PPO epoch / mini-batch: :func:`ppo_policy_loss` + ``vf_coef *`` :func:`value_loss`
   (``vf_coef = 0.1`` in TRL's former PPO trainer; 0.5 in classic PPO).
"""

from __future__ import annotations

from typing import Any

import torch

from ..regularizers.aggregation import aggregate
from ..regularizers.kl import kl_k1, kl_k3

Coef = float | torch.Tensor
Stats = dict[str, torch.Tensor]

#: Bound on ``|log pi - log pi_old|`` before ``exp`` in :func:`ppo_policy_loss` (``exp(20) ~ 4.85e8`` is finite
#: in float32); the same bound as :data:`llm_entreg.regularizers.K3_LOG_RATIO_CLAMP`.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    if ref.ndim != 2:
        raise ValueError(f"{ref_name}: expected shape [B, T], got {tuple(ref.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {ref_name} {tuple(ref.shape)}")


def _check_unit_interval(value: float, field: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{field}: must be in [0, 1], got {value}")


def _local_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached masked token mean of this micro-batch (0 for an empty mask)."""
    return aggregate(x.detach(), mask, "token-mean")


def last_token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the last real token of each row, and whether the row has one.

    Returns ``(index [B] long, has_token [B] bool)``; ``index`` is ``-1`` on an empty row. Found as the largest
    ``t`` with ``mask[b, t] != 0``, so right padding, early EOS and holes in the mask all work. No host sync.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape [B, T], got {tuple(mask.shape)}")
    B, T = mask.shape
    if T == 0:
        idx = torch.full((B,), -1, dtype=torch.long, device=mask.device)
    else:
        pos = torch.arange(T, device=mask.device).expand(B, T)
        idx = torch.where(mask != 0, pos, torch.full_like(pos, -1)).amax(dim=-1)
    return idx, idx >= 0


# --------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------


def token_rewards(
    score: torch.Tensor,
    mask: torch.Tensor,
    kl_per_token: torch.Tensor | None = None,
    kl_coef: Coef = 0.0,
    entropy_bonus: torch.Tensor | None = None,
) -> torch.Tensor:
    """Classic PPO-RLHF per-token reward ``[B, T]`` (Ziegler et al. 2019, Ouyang et al. 2022)::

        r_bt = -kl_coef * KL_bt  +  bonus_bt  +  score_b * 1[t == last_b]        on masked-in tokens,
        r_bt = 0                                                                  elsewhere,

    with ``last_b`` the last real token of row ``b`` (:func:`last_token_index`; the EOS token when the model
    stopped, the last generated token when it was truncated). An empty row gets no score and is all zeros.

    Args:
        score: sequence-level reward-model score, ``[B]`` or ``[B, 1]``.
        mask: completion mask ``[B, T]``.
        kl_per_token: per-token KL-to-reference estimate ``[B, T]``, e.g.
            ``regularizers.kl_penalty(logp_old, ref_logp, "k1")`` (classic; ``k3`` keeps every penalty >= 0).
        kl_coef: beta >= 0, a float or a 0-dim tensor (e.g. ``AdaptiveKLController.value``). Literature:
            0.02-0.2 (TRL's former PPO ``kl_coef`` 0.05; Ziegler et al.'s adaptive controller starts at 0.2).
        entropy_bonus: optional per-token entropy *reward*, already scaled by alpha
            (``regularizers.entropy_reward(H, mask, alpha)`` or ``sampled_entropy_reward(logp, mask, alpha)``).

    Everything is detached: the reward reaches the policy only through returns and advantages.
    Returns a tensor in ``promote_types(score, kl, bonus, float32)``.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape [B, T], got {tuple(mask.shape)}")
    B, T = mask.shape
    if score.ndim == 2 and score.shape[1] == 1:
        score = score[:, 0]
    if score.shape != (B,):
        raise ValueError(f"score: expected shape [B] = ({B},) or [B, 1], got {tuple(score.shape)}")
    _check_same_shape("mask", mask, kl_per_token=kl_per_token, entropy_bonus=entropy_bonus)
    if not isinstance(kl_coef, torch.Tensor) and not kl_coef >= 0:
        raise ValueError(f"kl_coef: must be >= 0, got {kl_coef}")

    extra = [t for t in (kl_per_token, entropy_bonus) if t is not None]
    acc = _acc_dtype(score, *extra)
    m = mask != 0
    zeros = torch.zeros((B, T), dtype=acc, device=mask.device)

    idx, has = last_token_index(mask)
    s = torch.where(has, score.detach().to(acc), torch.zeros((), dtype=acc, device=mask.device))
    # Empty rows scatter a 0 into column 0; with T == 0 there is nowhere to put anything.
    rewards = zeros.scatter(1, idx.clamp_min(0)[:, None], s[:, None]) if T > 0 else zeros

    if kl_per_token is not None:
        pen = kl_coef * kl_per_token.detach().to(acc)
        rewards = rewards - torch.where(m, pen, zeros)
    if entropy_bonus is not None:
        rewards = rewards + torch.where(m, entropy_bonus.detach().to(acc), zeros)
    return rewards


# --------------------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# --------------------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards in time over the real tokens.

    For the real tokens ``t_1 < ... < t_n`` of a row (``mask != 0``), with ``V(after t_n) = 0`` (the
    completion is terminal: EOS, or the end of the episode when truncated)::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next          (A_next = 0 after the last real token)
        R_t     = A_t + V_t                                (the value target, lambda-return)

    where ``next`` is the next *real* token of the row: masked-out positions are skipped, not treated as time
    steps (right padding is the usual case; a hole in the middle, e.g. a masked tool output, is stepped over).
    Masked-out positions get advantage 0 and return 0. ``gamma = lam = 1`` gives Monte-Carlo advantages
    ``A_t = sum_{s >= t} r_s - V_t``; ``lam = 0`` gives one-step TD errors.

    Args:
        rewards: per-token rewards ``[B, T]`` (:func:`token_rewards`).
        values: ``V(s_t)`` of the rollout's critic ``[B, T]``.
        mask: completion mask ``[B, T]``.
        gamma: discount in ``[0, 1]``. Default 1.0 (InstructGPT; TRL's former PPO trainer) -- an LM episode is
            short and the score arrives at its end.
        lam: GAE lambda in ``[0, 1]``. Default 0.95 (InstructGPT; TRL; verl). verl's / Hu et al.'s "REINFORCE-
            like" critic-free setups use ``lam = 1``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, detached, in ``promote_types(rewards, values, float32)``.
        Vectorized over the batch, a loop over ``T``.
    """
    _check_same_shape("rewards", rewards, values=values, mask=mask)
    _check_unit_interval(gamma, "gamma")
    _check_unit_interval(lam, "lam")
    acc = _acc_dtype(rewards, values)
    B, T = rewards.shape
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    r = torch.where(m, rewards.detach().to(acc), zero)
    v = torch.where(m, values.detach().to(acc), zero)

    next_value = torch.zeros(B, dtype=acc, device=rewards.device)
    next_adv = torch.zeros(B, dtype=acc, device=rewards.device)
    advs: list[torch.Tensor] = [next_adv] * T
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + (gamma * lam) * next_adv
        mt = m[:, t]
        # A masked-out position is not a step: it carries the next real token's value and advantage through.
        next_adv = torch.where(mt, adv_t, next_adv)
        next_value = torch.where(mt, v[:, t], next_value)
        advs[t] = torch.where(mt, adv_t, zero)
    advantages = torch.stack(advs, dim=1) if T > 0 else torch.zeros((B, 0), dtype=acc, device=rewards.device)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


# --------------------------------------------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------------------------------------------


def _dist_ready(distributed: bool) -> bool:
    return distributed and torch.distributed.is_available() and torch.distributed.is_initialized()


def masked_mean_var(
    x: torch.Tensor,
    mask: torch.Tensor,
    unbiased: bool = True,
    *,
    distributed: bool = False,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked mean and variance of ``x [B, T]``: ``(mean, var, count)``, 0-dim tensors.

    ``mean = sum m x / n``, ``var = sum m (x - mean)^2 / (n - 1)`` (``unbiased``, Bessel's correction) or
    ``/ n``; ``n = sum m``. A zero denominator (``n = 0``, or ``n = 1`` unbiased) gives ``var = 0`` (and
    ``mean = 0`` for ``n = 0``), never NaN. ``mask`` may be 0/1 or a float weight.

    ``distributed=True`` with an initialized ``torch.distributed`` all-reduces (SUM over ``group``) first
    ``[sum, n]`` and then ``sum m (x - mean)^2``, so every rank gets the statistics of the concatenated global
    batch (two-pass, no ``E[x^2] - E[x]^2`` cancellation). It is a collective: every rank must call it. The
    global statistics carry no gradient. Without a process group it is the local computation.
    """
    _check_same_shape("x", x, mask=mask)
    acc = _acc_dtype(x)
    w = mask.to(acc)
    v = torch.where(w != 0, x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    if _dist_ready(distributed):
        v, w = v.detach(), w.detach()
        sums = torch.stack([(w * v).sum(), w.sum()])
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
        total, n = sums[0], sums[1]
    else:
        total, n = (w * v).sum(), w.sum()
    one = torch.ones_like(n)
    mean = total / torch.where(n > 0, n, one)
    dev = torch.where(w != 0, v - mean, torch.zeros_like(v))
    sq = (w * dev * dev).sum()
    if _dist_ready(distributed):
        sq = sq.detach().clone()
        torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    denom = n - 1 if unbiased else n
    var = torch.where(denom > 0, sq / torch.where(denom > 0, denom, one), torch.zeros_like(sq))
    return mean, var, n


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    unbiased: bool = True,
    distributed: bool = False,
    group: Any = None,
) -> torch.Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)``, plus ``mean`` back when ``shift_mean=False``.

    ``mean`` / ``var`` are :func:`masked_mean_var` over the masked-in tokens of the whole batch (all rows
    together). ``unbiased=True`` (default) uses Bessel's ``n - 1``, as the masked whitening of TRL's former PPO
    trainer and verl; then the whitened masked values have unbiased variance ``var / (var + eps) ~ 1`` (biased
    variance with ``unbiased=False``), and masked mean 0 (``shift_mean``) or the original mean.

    Use ``shift_mean=True`` for advantages (the default of PPO implementations), ``shift_mean=False`` to rescale
    rewards without moving their mean (TRL's ``whiten_rewards``). ``distributed=True`` takes the statistics over
    all data-parallel ranks (a collective; see :func:`masked_mean_var`) -- otherwise the statistics are this
    process's. Masked-out positions are 0 in the output. Single-token or empty masks give 0 (``shift_mean``)
    or ``x`` unchanged, never NaN.
    """
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    mean, var, _ = masked_mean_var(x, mask, unbiased, distributed=distributed, group=group)
    m = mask != 0
    v = torch.where(m, x.to(mean.dtype), torch.zeros_like(mean))
    safe = torch.where(var + eps > 0, var + eps, torch.ones_like(var))
    out = (v - mean) * torch.rsqrt(safe)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


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


def ppo_policy_loss(
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
    _check_same_shape("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    check_clip_range(clip_low, clip_high)
    acc = _acc_dtype(logp, old_logp, advantages)
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
            "clipfrac": _local_mean((clip_high_active | clip_low_active).to(acc), mask),
            "clipfrac_low": _local_mean(clip_low_active.to(acc), mask),
            "clipfrac_high": _local_mean(clip_high_active.to(acc), mask),
            "approx_kl": _local_mean(kl_k1(old, lp.detach()), mask),
            "policy_kl_k3": _local_mean(kl_k3(old, lp.detach()), mask),
            "ratio_mean": _local_mean(ratio, mask),
        }
    return loss, stats


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[target - pred] / Var[target]`` over the masked-in tokens (detached, 0-dim).

    1 for a perfect predictor, 0 for predicting the mean, negative when worse than the mean. Variances are the
    biased masked variances (the ratio is the same with Bessel's correction). Returns 0 when ``Var[target]``
    is 0 (empty mask, a single token, or a constant target): nothing to explain, and never NaN.
    """
    _check_same_shape("pred", pred, target=target, mask=mask)
    acc = _acc_dtype(pred, target)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=pred.device)
    p = torch.where(m, pred.detach().to(acc), zero)
    y = torch.where(m, target.detach().to(acc), zero)
    _, var_y, _ = masked_mean_var(y, mask, unbiased=False)
    _, var_res, _ = masked_mean_var(y - p, mask, unbiased=False)
    ok = var_y > 0
    return torch.where(ok, 1.0 - var_res / torch.where(ok, var_y, torch.ones_like(var_y)), torch.zeros_like(var_y))


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
    _check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    if clip_range_value is not None and not clip_range_value >= 0:
        raise ValueError(f"clip_range_value: must be >= 0 or None, got {clip_range_value}")
    acc = _acc_dtype(values, old_values, returns)
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
        "vf_clipfrac": _local_mean(clip_active.to(acc), mask),
        "explained_variance": explained_variance(v, ret, mask),
        "value_mean": _local_mean(v, mask),
        "return_mean": _local_mean(ret, mask),
    }
    return loss, stats


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
