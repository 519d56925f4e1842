"""KL-to-reference: per-token estimators k1/k2/k3, in the reward or in the loss, and the KL coefficient controllers.

Which estimator estimates what, and what its gradient does in the loss: docs/formulations.md ("KL-to-reference
estimators").
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .aggregation import aggregate

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
#: verl-style names accepted as aliases.
KL_ESTIMATOR_ALIASES: dict[str, str] = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
#: Default bound on ``|r|`` in :func:`kl_k3` (``exp(20) ~ 4.85e8`` is finite in float32 and bfloat16).
K3_LOG_RATIO_CLAMP = 20.0


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log pi - log pi_ref`` per token (unbiased, may be negative)."""
    return _acc(logp) - _acc(ref_logp)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``1/2 (log pi - log pi_ref)^2`` per token (``>= 0``, biased)."""
    d = _acc(logp) - _acc(ref_logp)
    return 0.5 * d * d


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = K3_LOG_RATIO_CLAMP) -> torch.Tensor:
    """``exp(r) - r - 1`` with ``r = log pi_ref - log pi``, per token (unbiased, ``>= 0``).

    Numerics: computed in at least float32 as ``expm1(r) - r`` (no cancellation of the ``- 1`` near
    ``r = 0``); ``r`` is clamped to ``[-clamp, clamp]`` first (default 20, so the value stays below
    ``exp(20) ~ 4.85e8`` and never overflows -- the gradient is zero where the clamp is active, i.e. for tokens
    whose probability ratio exceeds ``e^20``); the result is clamped at 0 so rounding can never make it
    negative. Gradient w.r.t. ``logp``: ``1 - pi_ref / pi``.
    """
    if not clamp > 0:
        raise ValueError(f"clamp: must be > 0, got {clamp}")
    r = (_acc(ref_logp) - _acc(logp)).clamp(-clamp, clamp)
    return (torch.expm1(r) - r).clamp_min(0.0)


def resolve_kl_estimator(estimator: str, field: str = "kl_estimator") -> str:
    """Canonical name (``k1``/``k2``/``k3``) of ``estimator`` or its alias; ``ValueError`` naming ``field``."""
    name = KL_ESTIMATOR_ALIASES.get(estimator, estimator)
    if name not in KL_ESTIMATORS:
        raise ValueError(
            f"{field}: unknown KL estimator {estimator!r}; choose from {KL_ESTIMATORS} "
            f"(aliases {sorted(KL_ESTIMATOR_ALIASES)})"
        )
    return name


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, dispatching on ``estimator`` (``k1``/``k2``/``k3`` or an alias)."""
    name = resolve_kl_estimator(estimator)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp: shape {tuple(ref_logp.shape)} does not match logp {tuple(logp.shape)}")
    if name == "k1":
        return kl_k1(logp, ref_logp)
    if name == "k2":
        return kl_k2(logp, ref_logp)
    return kl_k3(logp, ref_logp)


def _check_kl_coef(coef: float | torch.Tensor, field: str = "kl_coef") -> None:
    if not isinstance(coef, torch.Tensor) and not coef >= 0:
        raise ValueError(f"{field}: must be >= 0, got {coef}")


def kl_in_reward(
    rewards_per_token: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    coef: float | torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rewards_per_token - coef * KL_t`` (classic PPO-RLHF), with ``KL_t`` detached.

    Returns a new ``[B, T]`` tensor; where ``mask`` is 0 the reward is returned unchanged. The penalty carries
    no gradient: it reaches the policy through returns and advantages.
    """
    _check_kl_coef(coef)
    kl = kl_penalty(logp, ref_logp, estimator).detach()
    pen = coef * kl
    if mask is not None:
        pen = torch.where(mask.bool(), pen, torch.zeros_like(pen))
    return rewards_per_token - pen.to(rewards_per_token.dtype)


def kl_in_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float | torch.Tensor,
    estimator: str = "k3",
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> torch.Tensor:
    """``coef * aggregate(KL_t, mask, loss_agg_mode)``: the (differentiable) term to ADD to the loss (GRPO).

    ``agg_kwargs`` are :func:`.aggregate`'s global normalizers / ``max_len``; use the same mode as the policy
    term so the two are aggregated identically. ``coef == 0`` returns an exact 0.
    """
    _check_kl_coef(coef)
    if not isinstance(coef, torch.Tensor) and coef == 0:
        return torch.zeros((), dtype=torch.promote_types(logp.dtype, torch.float32), device=logp.device)
    return coef * aggregate(kl_penalty(logp, ref_logp, estimator), mask, loss_agg_mode, **agg_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Coefficient controllers
# --------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient. ``update`` is a no-op; kept so trainers treat both controllers alike.

    Args:
        kl_coef: beta, default 0.05. Range ``>= 0``. Literature: PPO-RLHF 0.02-0.2; GRPO 0.04 (DeepSeekMath),
            0 in many recent recipes (DAPO, Dr. GRPO).
    """

    def __init__(self, kl_coef: float = 0.05) -> None:
        _check_kl_coef(kl_coef)
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed_kl", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, "fixed_kl")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

    After each batch: ``e = clip(current_kl / target_kl - 1, -0.2, 0.2)`` and
    ``value *= 1 + e * n_steps / horizon`` -- the coefficient grows when the measured KL is above target,
    shrinks when below, by at most 20% of ``n_steps / horizon`` per update.

    Args:
        kl_coef: initial beta, default 0.2 (Ziegler et al.; TRL's PPO ``init_kl_coef``). Range ``>= 0``.
        target_kl: target KL in nats, default 6.0 (Ziegler et al.). Range ``> 0``.
        horizon: number of samples over which the proportional error is integrated, default 10000 (Ziegler
            et al.). Range ``> 0``.
    """

    def __init__(self, kl_coef: float = 0.2, target_kl: float = 6.0, horizon: float = 10000) -> None:
        _check_kl_coef(kl_coef)
        if not target_kl > 0:
            raise ValueError(f"target_kl: must be > 0, got {target_kl}")
        if not horizon > 0:
            raise ValueError(f"horizon: must be > 0, got {horizon}")
        self.value = float(kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update from the KL measured on the last batch of ``n_steps`` samples; return the new coefficient."""
        if n_steps < 0:
            raise ValueError(f"n_steps: must be >= 0, got {n_steps}")
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive_kl", "value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, "adaptive_kl")
        self.value = float(state["value"])
        self.target_kl = float(state["target_kl"])
        self.horizon = float(state["horizon"])


def _check_type(state: dict[str, Any], expected: str) -> None:
    got = state.get("type")
    if got != expected:
        raise ValueError(f"state_dict: saved by a {got!r} controller, cannot load into {expected!r}")


__all__ = [
    "K3_LOG_RATIO_CLAMP",
    "KL_ESTIMATORS",
    "KL_ESTIMATOR_ALIASES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "kl_in_loss",
    "kl_in_reward",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "resolve_kl_estimator",
]
