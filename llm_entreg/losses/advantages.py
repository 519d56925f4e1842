"""Per-token rewards, advantages and their statistics for PPO-RLHF on ``[B, T]`` completion tensors.

Shapes, masks and dtypes follow docs/formulations.md ("Conventions of the per-token math"): padding may hold
NaN/inf and is never read, outputs are 0 there, and no function returns NaN for an empty mask.
"""

from __future__ import annotations

from typing import Any

import torch

from ..regularizers.aggregation import aggregate

Coef = float | torch.Tensor


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    if ref.ndim != 2:
        raise ValueError(f"{ref_name}: expected shape [B, T], got {tuple(ref.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {ref_name} {tuple(ref.shape)}")


def check_unit_interval(value: float, field: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{field}: must be in [0, 1], got {value}")


def local_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
    check_same_shape("mask", mask, kl_per_token=kl_per_token, entropy_bonus=entropy_bonus)
    if not isinstance(kl_coef, torch.Tensor) and not kl_coef >= 0:
        raise ValueError(f"kl_coef: must be >= 0, got {kl_coef}")

    extra = [t for t in (kl_per_token, entropy_bonus) if t is not None]
    acc = acc_dtype(score, *extra)
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
    check_same_shape("rewards", rewards, values=values, mask=mask)
    check_unit_interval(gamma, "gamma")
    check_unit_interval(lam, "lam")
    acc = acc_dtype(rewards, values)
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
    check_same_shape("x", x, mask=mask)
    acc = acc_dtype(x)
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


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[target - pred] / Var[target]`` over the masked-in tokens (detached, 0-dim).

    1 for a perfect predictor, 0 for predicting the mean, negative when worse than the mean. Variances are the
    biased masked variances (the ratio is the same with Bessel's correction). Returns 0 when ``Var[target]``
    is 0 (empty mask, a single token, or a constant target): nothing to explain, and never NaN.
    """
    check_same_shape("pred", pred, target=target, mask=mask)
    acc = acc_dtype(pred, target)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=pred.device)
    p = torch.where(m, pred.detach().to(acc), zero)
    y = torch.where(m, target.detach().to(acc), zero)
    _, var_y, _ = masked_mean_var(y, mask, unbiased=False)
    _, var_res, _ = masked_mean_var(y - p, mask, unbiased=False)
    ok = var_y > 0
    return torch.where(ok, 1.0 - var_res / torch.where(ok, var_y, torch.ones_like(var_y)), torch.zeros_like(var_y))


__all__ = [
    "acc_dtype",
    "check_same_shape",
    "check_unit_interval",
    "explained_variance",
    "gae",
    "last_token_index",
    "local_mean",
    "masked_mean_var",
    "token_rewards",
    "whiten",
]
