"""Reduce a per-token tensor ``[B, T]`` to the scalar that enters the loss (four ``loss_agg_mode``s, named as in
verl / TRL), with global (cross-rank, cross-accumulation) normalizers so a coefficient means the same at any world
size and accumulation. :func:`token_weights` gives the per-token weights of the same reduction. The modes and the
normalizer contract: docs/formulations.md ("Aggregation modes and the global normalizer").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

#: Every aggregation mode, in the order the docs list them.
LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

Count = int | float | torch.Tensor


def check_loss_agg_mode(mode: str, field: str = "loss_agg_mode") -> str:
    """Return ``mode`` if it is a known aggregation mode, else raise ``ValueError`` naming ``field``."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{field}: unknown aggregation mode {mode!r}; choose from {LOSS_AGG_MODES}")
    return mode


def _safe_denominator(d: torch.Tensor) -> torch.Tensor:
    """``d`` where positive, 1 elsewhere (a zero count always comes with a zero numerator)."""
    return torch.where(d > 0, d, torch.ones_like(d))


def _count_tensor(count: Count, field: str, like: torch.Tensor) -> torch.Tensor:
    # Python numbers are checked here; tensors are not (reading a CUDA value back would sync the device).
    if not isinstance(count, torch.Tensor) and count < 0:
        raise ValueError(f"{field}: must be >= 0, got {count}")
    c = torch.as_tensor(count, dtype=like.dtype, device=like.device).detach()
    if c.ndim != 0:
        raise ValueError(f"{field}: expected a scalar count, got shape {tuple(c.shape)}")
    return c


def _check_max_len(max_len: int | None) -> None:
    if max_len is None:
        raise ValueError(
            "max_len: required for loss_agg_mode='seq-mean-token-sum-norm' (a constant, e.g. max_completion_length)"
        )
    if max_len <= 0:
        raise ValueError(f"max_len: must be > 0, got {max_len}")


def masked_values(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(values * mask, mask)`` in the accumulation dtype (at least float32).

    Masked-out positions become exactly 0 even when ``values`` holds NaN/inf there.
    """
    if values.ndim != 2:
        raise ValueError(f"values: expected shape [B, T], got {tuple(values.shape)}")
    if mask.shape != values.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match values {tuple(values.shape)}")
    acc = torch.promote_types(values.dtype, torch.float32)
    m = mask.to(acc)
    v = values.to(acc)
    return torch.where(m != 0, v * m, torch.zeros_like(v)), m


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_token_count: Count | None = None,
    global_seq_count: Count | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` under ``mask [B, T]`` (bool or 0/1 float) to a scalar.

    Args:
        values: per-token values (differentiable).
        mask: which tokens count; may be a float weight.
        mode: one of :data:`LOSS_AGG_MODES` (docs/formulations.md has the formulas).
        global_token_count: ``token-mean`` only -- the number of masked tokens summed over data-parallel ranks
            and the gradient-accumulation micro-batches of the optimizer step. The result is then this
            micro-batch's *share* ``sum / global_token_count``; see :func:`global_mean_loss_scale` for the factor the
            caller must apply (:func:`global_mean_loss_scale`, docs/formulations.md). Ignored by the other modes.
        global_seq_count: ``seq-*`` modes only -- the number of sequences (rows, empty ones included) summed
            over ranks and micro-batches. Ignored by ``token-mean``.
        max_len: ``seq-mean-token-sum-norm`` only (required there) -- the constant per-sequence divisor, e.g.
            ``max_completion_length``. Ignored by the other modes.

    Returns:
        A 0-dim tensor in ``promote_types(values.dtype, float32)``; never NaN for an all-zero mask.
    """
    check_loss_agg_mode(mode, "mode")
    v, m = masked_values(values, mask)

    if mode == "token-mean":
        denom = m.sum() if global_token_count is None else _count_tensor(global_token_count, "global_token_count", v)
        return v.sum() / _safe_denominator(denom)

    if mode == "seq-mean-token-mean":
        per_seq = v.sum(-1) / _safe_denominator(m.sum(-1))
    elif mode == "seq-mean-token-sum":
        per_seq = v.sum(-1)
    else:  # seq-mean-token-sum-norm
        _check_max_len(max_len)
        per_seq = v.sum(-1) / max_len

    if global_seq_count is None:
        denom = torch.tensor(float(values.shape[0]), dtype=v.dtype, device=v.device)
    else:
        denom = _count_tensor(global_seq_count, "global_seq_count", v)
    return per_seq.sum() / _safe_denominator(denom)


def token_weights(
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_token_count: Count | None = None,
    global_seq_count: Count | None = None,
    max_len: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token weights ``w [B, T]`` of :func:`aggregate`: ``aggregate(v, mask, mode, **kw) == (w * v).sum()``.

    Same arguments and normalizers as :func:`aggregate` (a float ``mask`` is a weight and enters ``w``); ``w`` is 0
    where ``mask`` is 0 and carries no gradient. ``dtype``: the weights' dtype (default: at least float32). This is
    how a term whose gradient is formed elsewhere (the loss-fused head) gets exactly the aggregation's scaling.
    """
    check_loss_agg_mode(mode, "mode")
    if mask.ndim != 2:
        raise ValueError(f"mask: expected shape [B, T], got {tuple(mask.shape)}")
    acc = dtype or torch.promote_types(mask.dtype if mask.dtype.is_floating_point else torch.float32, torch.float32)
    m = mask.detach().to(acc)
    if mode == "token-mean":
        denom = m.sum() if global_token_count is None else _count_tensor(global_token_count, "global_token_count", m)
        return m / _safe_denominator(denom)
    if mode == "seq-mean-token-mean":
        per_token = m / _safe_denominator(m.sum(-1, keepdim=True))
    elif mode == "seq-mean-token-sum":
        per_token = m
    else:  # seq-mean-token-sum-norm
        _check_max_len(max_len)
        per_token = m / max_len
    if global_seq_count is None:
        denom = torch.tensor(float(mask.shape[0]), dtype=acc, device=mask.device)
    else:
        denom = _count_tensor(global_seq_count, "global_seq_count", m)
    return per_token / _safe_denominator(denom)


def local_token_and_seq_counts(masks: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-token count and row count of one micro-batch mask or of a list of them, as float64 tensors."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("masks: need at least one mask")
    device = masks[0].device
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    seqs = torch.zeros((), dtype=torch.float64, device=device)
    for m in masks:
        if m.ndim != 2:
            raise ValueError(f"masks: expected [B, T] masks, got shape {tuple(m.shape)}")
        tokens = tokens + m.detach().to(device=device, dtype=torch.float64).sum()
        seqs = seqs + m.shape[0]
    return tokens, seqs


def global_token_and_seq_counts(
    masks: torch.Tensor | Sequence[torch.Tensor], group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(token_count, seq_count)`` of one optimizer step, for :func:`aggregate`'s global normalizers.

    Pass *all* of this rank's micro-batch masks of the accumulation window (or one mask covering the whole
    window). The local counts are summed with ``torch.distributed.all_reduce(SUM)`` over ``group`` when
    ``torch.distributed`` is initialized; in a single process this is a no-op. Every rank must call it (it is
    a collective). Returns float64 0-dim tensors on the masks' device (use a CUDA mask with NCCL).
    """
    tokens, seqs = local_token_and_seq_counts(masks)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.stack([tokens, seqs])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.SUM, group=group)
        tokens, seqs = both[0], both[1]
    return tokens, seqs


def data_parallel_world_size(group=None) -> int:
    """Number of data-parallel ranks: ``torch.distributed`` world size when initialized, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


def global_mean_loss_scale(world_size: int | None = None, *, framework_loss_divisor: float = 1.0) -> float:
    """Factor to multiply a globally-normalised contribution by before ``backward``.

    ``world_size * framework_loss_divisor``: ``world_size`` undoes DDP's gradient *averaging* over ranks, and
    ``framework_loss_divisor`` undoes any division the framework applies to the loss afterwards (e.g. the GA
    steps when HF ``Trainer`` divides by ``current_gradient_accumulation_steps``; 1 when nothing does).
    With it, the accumulated, all-reduced gradient equals the gradient of the exact global mean.

    Args:
        world_size: data-parallel ranks; ``None`` reads it from ``torch.distributed`` (1 when not initialized).
        framework_loss_divisor: what the framework later divides this loss by (>= 1 typically).
    """
    if world_size is None:
        world_size = data_parallel_world_size()
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size: must be an integer >= 1, got {world_size}")
    if not framework_loss_divisor > 0:
        raise ValueError(f"framework_loss_divisor: must be > 0, got {framework_loss_divisor}")
    return float(world_size) * float(framework_loss_divisor)
