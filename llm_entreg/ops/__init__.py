"""Per-token log-prob + entropy ops: one dispatch point over the backends (``auto``, ``torch``, ``chunked``,
``triton``).

``logprob_and_entropy`` works on materialized logits ``[..., V]``; ``linear_logprob_and_entropy`` is the fused LM
head (``hidden [N, d]``, ``weight [V, d]``) that never holds the ``[N, V]`` logits whole; ``fused_linear_loss`` forms
a per-token loss's gradient in the forward. Contracts, backends and tests: docs/kernels.md.
"""

from __future__ import annotations

import torch

from ._common import (BACKENDS, EXTRA_OUTPUTS, TokenStats, check_extras, check_linear, check_logits, gathered_params,
                      resolve_backend, triton_available)
from .chunked import chunked_linear_token_stats, chunked_token_stats
from .fused_loss import FUSED_LOSS_BACKENDS, LossFn, fused_linear_loss
from .reference import reference_linear_token_stats, reference_token_stats

__all__ = [
    "BACKENDS",
    "EXTRA_OUTPUTS",
    "FUSED_LOSS_BACKENDS",
    "LossFn",
    "TokenStats",
    "fused_linear_loss",
    "gathered_params",
    "linear_logprob_and_entropy",
    "linear_token_stats",
    "logprob_and_entropy",
    "token_stats",
    "resolve_backend",
    "triton_available",
]


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    extras: tuple[str, ...] = (),
) -> TokenStats:
    """:func:`logprob_and_entropy` plus the no-grad extras (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``)."""
    check_logits(logits, targets, temperature, ignore_index)
    extras = check_extras(extras)
    backend = resolve_backend(backend, logits.device)
    lead = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    with torch.autocast(logits.device.type, enabled=False):  # the op owns its precision
        if backend == "torch":
            stats = reference_token_stats(
                flat_logits, flat_targets, temperature=temperature, ignore_index=ignore_index, extras=extras
            )
        elif backend == "chunked":
            stats = chunked_token_stats(flat_logits, flat_targets, float(temperature), ignore_index, extras)
        else:
            from .triton_logits import triton_token_stats

            stats = triton_token_stats(flat_logits, flat_targets, float(temperature), ignore_index, extras)
    return TokenStats(*(None if t is None else t.reshape(lead) for t in stats))


def logprob_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(logits / T)[target]`` and entropy of ``softmax(logits / T)``, shaped like ``targets``."""
    stats = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index, backend=backend)
    return stats.logprobs, stats.entropy


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    extras: tuple[str, ...] = (),
) -> TokenStats:
    """:func:`linear_logprob_and_entropy` plus the no-grad extras."""
    compute_dtype = check_linear(hidden, weight, bias, targets, temperature, ignore_index)
    extras = check_extras(extras)
    backend = resolve_backend(backend, hidden.device)
    if backend == "torch":  # half-precision operands, fp32 logits and math (the op owns its precision)
        with torch.autocast(hidden.device.type, enabled=False):
            return reference_linear_token_stats(
                hidden.to(compute_dtype),
                weight.to(compute_dtype),
                targets,
                bias=None if bias is None else bias.to(compute_dtype),
                temperature=temperature,
                ignore_index=ignore_index,
                dtype=torch.float32,
                extras=extras,
            )
    if backend == "chunked":
        impl = chunked_linear_token_stats
    else:
        from .triton_linear import triton_linear_token_stats as impl
    return impl(hidden, weight, bias, targets, float(temperature), ignore_index, extras, compute_dtype)


def linear_logprob_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head: per-token log-prob and entropy of ``softmax((hidden @ weight.T + bias) / T)``.

    ``hidden [N, d]``, ``weight [V, d]``, ``bias [V]`` or None, ``targets [N]``. Gradients flow to hidden, weight and
    bias; the ``[N, V]`` logits are never materialized whole (except with ``backend="torch"``).
    """
    stats = linear_token_stats(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend
    )
    return stats.logprobs, stats.entropy
