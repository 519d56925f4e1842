"""Entropy bonus: per-token entropies in, a loss term or a per-token reward out.

Three formulations (``entropy_level``): ``"token"`` (``loss -= β agg(H_t)``), ``"sequence"`` (per-sequence sum,
the chain-rule sequence entropy) and ``"reward"`` (``r_t += α H_t``, maximum-entropy RL). Which fits which algorithm,
and the literature values: docs/formulations.md ("The three formulations").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .aggregation import aggregate, check_loss_agg_mode

EntropyLevel = Literal["token", "sequence", "reward"]
ENTROPY_LEVELS: tuple[str, ...] = ("token", "sequence", "reward")
#: Aggregations accepted at ``entropy_level="sequence"`` (they sum over tokens within a sequence).
SEQUENCE_AGG_MODES: tuple[str, ...] = ("seq-mean-token-sum", "seq-mean-token-sum-norm")
_DEFAULT_AGG = {"token": "token-mean", "sequence": "seq-mean-token-sum", "reward": None}

Coef = float | torch.Tensor


def check_entropy_coef(coef: Coef, allow_entropy_minimization: bool = False, field: str = "entropy_coef") -> None:
    """Raise ``ValueError`` naming ``field`` if ``coef`` is negative and minimisation was not allowed.

    Tensors are not inspected (reading a device value back would synchronise); they come from controllers
    whose values are non-negative by construction.
    """
    if isinstance(coef, torch.Tensor):
        return
    if coef != coef:  # NaN
        raise ValueError(f"{field}: must be a number, got NaN")
    if coef < 0 and not allow_entropy_minimization:
        raise ValueError(
            f"{field}: got {coef} < 0, which minimises entropy; set allow_entropy_minimization=True if you mean it"
        )


# --------------------------------------------------------------------------------------------------------------
# Which tokens count
# --------------------------------------------------------------------------------------------------------------


def entropy_quantile_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """Entropy value above which the top ``top_quantile`` fraction of the masked tokens lies.

    The ``(1 - top_quantile)`` quantile of the masked entropies, with linear interpolation between order
    statistics (as ``torch.quantile``'s default, but without its input-size limit). Returns ``-inf`` when no
    token is masked in (then nothing is selected anyway). Detached.
    """
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile: must be in [0, 1], got {top_quantile}")
    vals = entropy.detach()[mask.bool()].to(torch.float64)
    n = vals.numel()
    if n == 0:
        return torch.tensor(float("-inf"), dtype=torch.float64, device=entropy.device)
    s = vals.sort().values
    pos = (1.0 - top_quantile) * (n - 1)
    lo = int(pos)  # floor, pos >= 0
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return s[lo] + (s[hi] - s[lo]) * frac


def global_entropy_quantile_threshold(
    entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float, group=None
) -> torch.Tensor:
    """:func:`entropy_quantile_threshold` over the masked entropies of EVERY data-parallel rank (as TRL's GRPO).

    Each rank contributes its masked-in values (any number, zero included); they are gathered with
    ``torch.distributed.all_gather`` over ``group`` (padded to the longest rank) and every rank gets the same
    threshold. Without an initialized process group it is the local threshold. Every rank must call it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return entropy_quantile_threshold(entropy, mask, top_quantile)
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return entropy_quantile_threshold(entropy, mask, top_quantile)
    local = entropy.detach()[mask.bool()].to(torch.float64).reshape(-1)
    # gloo has no all_gather for unequal sizes: exchange the counts, then pad every rank to the longest
    count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count, group=group)
    longest = max(int(c.item()) for c in counts)
    padded = torch.zeros(longest, dtype=torch.float64, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    values = torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])
    return entropy_quantile_threshold(values, torch.ones_like(values, dtype=torch.bool), top_quantile)


def top_entropy_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    top_quantile: float,
    threshold: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the masked-in tokens whose entropy is in the top ``top_quantile`` fraction.

    ``top_quantile = 1.0`` returns ``mask`` (as bool) unchanged; ``0.0`` keeps only the maximum-entropy
    token(s). Selection is ``entropy >= threshold``; pass ``threshold`` to use one computed elsewhere (e.g. on
    entropies gathered from every rank), otherwise it is :func:`entropy_quantile_threshold` of this batch.
    The mask carries no gradient.
    """
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile: must be in [0, 1], got {top_quantile}")
    keep = mask.bool()
    if top_quantile >= 1.0 and threshold is None:
        return keep
    if threshold is None:
        threshold = entropy_quantile_threshold(entropy, mask, top_quantile)
    thr = torch.as_tensor(threshold, device=entropy.device)
    return keep & (entropy.detach().to(thr.dtype) >= thr)


# --------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------


def entropy_loss_term(
    entropy: torch.Tensor, mask: torch.Tensor, coef: Coef, loss_agg_mode: str = "token-mean", **agg_kwargs: Any
) -> torch.Tensor:
    """``-coef * aggregate(entropy, mask, loss_agg_mode, **agg_kwargs)``: the term to ADD to the loss.

    With ``coef > 0`` a higher entropy lowers the loss. ``agg_kwargs`` are :func:`.aggregate`'s
    ``global_token_count`` / ``global_seq_count`` / ``max_len``. ``coef == 0`` returns an exact 0 (so a
    trainer with the bonus off reproduces its parent's loss bit for bit).
    """
    if not isinstance(coef, torch.Tensor) and coef == 0:
        acc = torch.promote_types(entropy.dtype, torch.float32)
        return torch.zeros((), dtype=acc, device=entropy.device)
    return -coef * aggregate(entropy, mask, loss_agg_mode, **agg_kwargs)


def entropy_reward(entropy: torch.Tensor, mask: torch.Tensor, coef: Coef) -> torch.Tensor:
    """Per-token reward bonus ``coef * H_t`` on masked-in tokens, 0 elsewhere; detached, shape ``[B, T]``."""
    h = entropy.detach()
    return torch.where(mask.bool(), coef * h, torch.zeros_like(h))


def sampled_entropy_reward(logp: torch.Tensor, mask: torch.Tensor, coef: Coef) -> torch.Tensor:
    """Per-token reward bonus ``-coef * log pi(a_t|s_t)`` on masked-in tokens, 0 elsewhere; detached.

    A single-sample estimate of ``coef * H_t`` (its expectation over ``a_t ~ pi``) when the full
    distribution's entropy is not available.
    """
    lp = logp.detach()
    return torch.where(mask.bool(), -coef * lp, torch.zeros_like(lp))


# --------------------------------------------------------------------------------------------------------------
# Config-like class
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EntropyBonus:
    """How the entropy bonus enters training. Invalid values fail at construction, naming the field.

    Attributes:
        entropy_coef: beta (loss levels) or alpha (reward level). Default ``0.0`` (off). Range ``>= 0``;
            ``< 0`` only with ``allow_entropy_minimization``. Literature: PPO 0.01; LM RL ~0 to 1e-4 (token
            level); Skywork-OR1 starts at 0 and lets a controller move it. A controller may pass the
            coefficient per call instead (``coef=`` of the methods).
        entropy_level: ``"token"`` (default), ``"sequence"`` or ``"reward"`` (docs/formulations.md says which
            algorithm each fits).
        entropy_loss_agg_mode: aggregation of the loss levels. Default ``None`` = ``"token-mean"`` at token level,
            ``"seq-mean-token-sum"`` at sequence level (which accepts only :data:`SEQUENCE_AGG_MODES`). Must be
            ``None`` at reward level (the reward is per token).
        entropy_bonus_top_quantile: fraction ``q`` in ``[0, 1]`` of the masked tokens, by entropy, that the bonus
            acts on. Default ``1.0`` (all). Literature: 0.2 (Wang et al. 2025, "Beyond the 80/20 rule",
            applied to the policy gradient). Token level only. The threshold is the ``1 - q`` quantile of
            this micro-batch unless ``threshold=`` is passed.
        allow_entropy_minimization: default ``False``; must be ``True`` for a negative ``entropy_coef``.
    """

    entropy_coef: float = 0.0
    entropy_level: EntropyLevel = "token"
    entropy_loss_agg_mode: str | None = None
    entropy_bonus_top_quantile: float = 1.0
    allow_entropy_minimization: bool = False

    def __post_init__(self) -> None:
        if self.entropy_level not in ENTROPY_LEVELS:
            raise ValueError(f"entropy_level: unknown level {self.entropy_level!r}; choose from {ENTROPY_LEVELS}")
        check_entropy_coef(self.entropy_coef, self.allow_entropy_minimization)
        mode = self.entropy_loss_agg_mode
        if mode is not None:
            check_loss_agg_mode(mode, "entropy_loss_agg_mode")
            if self.entropy_level == "reward":
                raise ValueError(
                    "entropy_loss_agg_mode: must be None for entropy_level='reward' (the bonus is a per-token reward)"
                )
            if self.entropy_level == "sequence" and mode not in SEQUENCE_AGG_MODES:
                raise ValueError(
                    f"entropy_loss_agg_mode: entropy_level='sequence' sums entropies over each sequence; choose from "
                    f"{SEQUENCE_AGG_MODES}, got {mode!r}"
                )
        q = self.entropy_bonus_top_quantile
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"entropy_bonus_top_quantile: must be in [0, 1], got {q}")
        if q < 1.0 and self.entropy_level != "token":
            raise ValueError(
                f"entropy_bonus_top_quantile: only supported at entropy_level='token', got level {self.entropy_level!r}"
            )

    @property
    def agg_mode(self) -> str | None:
        """The aggregation used: ``entropy_loss_agg_mode`` or the level's default (``None`` at reward level)."""
        mode = self.entropy_loss_agg_mode
        return mode if mode is not None else _DEFAULT_AGG[self.entropy_level]

    def _coef(self, coef: Coef | None) -> Coef:
        if coef is None:
            return self.entropy_coef
        check_entropy_coef(coef, self.allow_entropy_minimization, field="coef")
        return coef

    def effective_mask(
        self, entropy: torch.Tensor, mask: torch.Tensor, threshold: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The boolean token mask the loss term uses (``mask`` narrowed by ``entropy_bonus_top_quantile``).

        A trainer that passes ``global_token_count`` must count it on *this* mask.
        """
        return top_entropy_mask(entropy, mask, self.entropy_bonus_top_quantile, threshold)

    def loss_term(
        self,
        entropy: torch.Tensor,
        mask: torch.Tensor,
        coef: Coef | None = None,
        *,
        threshold: float | torch.Tensor | None = None,
        **agg_kwargs: Any,
    ) -> torch.Tensor:
        """Scalar to ADD to the loss: ``-coef * agg(H)`` over :meth:`effective_mask`.

        Token level: ``-beta * agg(H_t)`` with :attr:`agg_mode`. Sequence level: ``-beta * 1/S * sum_b sum_t
        H_bt`` (``seq-mean-token-sum``) or the same divided by ``max_len`` (``seq-mean-token-sum-norm``), with
        ``S`` the local row count or ``global_seq_count``. ``coef`` defaults to ``entropy_coef``;
        ``agg_kwargs`` go to :func:`.aggregate`. Raises at reward level (use :meth:`reward_term`).
        """
        if self.entropy_level == "reward":
            raise ValueError("entropy_level: 'reward' puts the bonus in the reward; call reward_term, not loss_term")
        c = self._coef(coef)
        eff = self.effective_mask(entropy, mask, threshold)
        return entropy_loss_term(entropy, eff, c, self.agg_mode, **agg_kwargs)

    def reward_term(self, entropy: torch.Tensor, mask: torch.Tensor, coef: Coef | None = None) -> torch.Tensor:
        """Per-token reward bonus ``alpha * H_t`` (``[B, T]``, detached, 0 off-mask). Reward level only."""
        self._require_reward_level()
        return entropy_reward(entropy, mask, self._coef(coef))

    def sampled_reward_term(self, logp: torch.Tensor, mask: torch.Tensor, coef: Coef | None = None) -> torch.Tensor:
        """Per-token reward bonus ``-alpha * log pi(a_t|s_t)`` (``[B, T]``, detached). Reward level only."""
        self._require_reward_level()
        return sampled_entropy_reward(logp, mask, self._coef(coef))

    def _require_reward_level(self) -> None:
        if self.entropy_level != "reward":
            raise ValueError(
                f"entropy_level: {self.entropy_level!r} puts the bonus in the loss; call loss_term, not reward_term"
            )


__all__ = [
    "ENTROPY_LEVELS",
    "SEQUENCE_AGG_MODES",
    "EntropyBonus",
    "EntropyLevel",
    "check_entropy_coef",
    "entropy_loss_term",
    "entropy_quantile_threshold",
    "global_entropy_quantile_threshold",
    "entropy_reward",
    "sampled_entropy_reward",
    "top_entropy_mask",
]
