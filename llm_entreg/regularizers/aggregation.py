"""Reduce a per-token tensor ``[B, T]`` to the scalar that enters the loss.

Four modes, named as in verl / TRL so users carry their habits over:

``token-mean`` (default)
    ``sum_{b,t} m_bt * v_bt / N`` with ``N`` the number of masked tokens. Every token weighs the same,
    whatever sequence it belongs to (TRL ``bnpo`` / ``dapo``, verl ``token-mean``).
``seq-mean-token-mean``
    ``1/S * sum_b (sum_t m_bt v_bt / sum_t m_bt)``: mean per sequence, then mean over sequences
    (TRL ``grpo``, the original GRPO paper). Short sequences weigh more per token.
``seq-mean-token-sum``
    ``1/S * sum_b sum_t m_bt v_bt``: per-sequence sum, then mean over sequences. This is the sequence-level
    estimator: on-policy, ``E[sum_t H_t] = H(pi(y|x))`` by the chain rule.
``seq-mean-token-sum-norm``
    ``1/S * sum_b sum_t m_bt v_bt / max_len`` with ``max_len`` a *constant* (e.g. ``max_completion_length``):
    Dr. GRPO's unbiased normalisation (TRL ``dr_grpo``). Equals ``seq-mean-token-sum / max_len``.

Here ``S`` is the number of sequences (rows) -- every row counts, including an *empty* row (all-zero mask),
which contributes 0 to the numerator (as in TRL's ``grpo`` loss). No mode ever returns NaN: a zero denominator
is replaced by 1 (its numerator is then 0 as well). Values at masked-out positions are never read, so padding
may hold NaN/inf.

Global normalizers -- the contract
----------------------------------
A user's coefficient must mean the same at 1 GPU or 64, gradient accumulation (GA) 1 or 16. With
``W`` data-parallel ranks, each running ``G`` micro-batches per optimizer step, let micro-batch ``(r, g)`` hold
masked sum ``S_rg`` and ``n_rg`` masked tokens, and ``N = sum_{r,g} n_rg`` (the *global token count* of the
optimizer step; :func:`global_token_and_seq_counts` computes it). Passing ``global_token_count=N`` makes
``aggregate`` return ``c_rg = S_rg / N``, so that

1. ``sum_{r,g} c_rg = sum S / N`` -- the exact token-mean over the concatenated global batch;
2. gradient accumulation *sums* the ``G`` micro-batch gradients on a rank (``sum_g grad c_rg``);
3. DDP (and DeepSpeed ZeRO, FSDP) then *average* over the ``W`` ranks, which divides by ``W``.

So the gradient that reaches the optimizer is ``(1/W) * grad(global mean)``. **The caller must multiply each
contribution by ``W``** before ``backward`` -- and additionally by ``G`` if the framework divides the loss by
the GA steps itself (HF ``Trainer.training_step`` does, unless the loss is flagged as already scaled for GA;
Accelerate's ``accelerator.backward`` does when it was built with ``gradient_accumulation_steps > 1``, which HF
``Trainer`` avoids by giving it 1; DeepSpeed's engine does unless ``scale_wrt_gas=False``, which HF ``Trainer``
passes).
:func:`global_mean_loss_scale` returns exactly that factor. Apply it once: HF ``Trainer.compute_loss`` already
multiplies by ``num_processes`` when ``average_tokens_across_devices`` is on and the model accepts loss kwargs.

The same holds for the sequence modes with ``global_seq_count`` (the number of rows summed over ranks and
micro-batches). Without a global count, each mode normalises by the local micro-batch (which equals the global
mean only when every micro-batch has the same count).
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
        mode: one of :data:`LOSS_AGG_MODES` (see the module docstring).
        global_token_count: ``token-mean`` only -- the number of masked tokens summed over data-parallel ranks
            and the gradient-accumulation micro-batches of the optimizer step. The result is then this
            micro-batch's *share* ``sum / global_token_count``; see the module docstring for the factor the
            caller must apply (:func:`global_mean_loss_scale`). Ignored by the other modes.
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
        if max_len is None:
            raise ValueError(
                "max_len: required for loss_agg_mode='seq-mean-token-sum-norm' (a constant, e.g. max_completion_length)"
            )
        if max_len <= 0:
            raise ValueError(f"max_len: must be > 0, got {max_len}")
        per_seq = v.sum(-1) / max_len

    if global_seq_count is None:
        denom = torch.tensor(float(values.shape[0]), dtype=v.dtype, device=v.device)
    else:
        denom = _count_tensor(global_seq_count, "global_seq_count", v)
    return per_seq.sum() / _safe_denominator(denom)


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
