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
from .clamped import check_clamp, clamp_active, clamped_linear_entropy, clamped_logits_entropy
from .fused_loss import FUSED_LOSS_BACKENDS, LossFn, fused_linear_loss
from .reference import reference_clamped_entropy, reference_linear_token_stats, reference_token_stats

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
    clamp_top_p: float | None = None,
    clamp_top_k: int | None = None,
) -> TokenStats:
    """:func:`logprob_and_entropy` plus the no-grad extras (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``).

    ``clamp_top_p`` / ``clamp_top_k``: the entropy is the clamped one (the distribution's top-k, then top-p, head
    renormalised; docs/formulations.md), with its exact gradient; the log-probs stay those of the full softmax.
    """
    check_logits(logits, targets, temperature, ignore_index)
    check_clamp(clamp_top_p, clamp_top_k)
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
        if clamp_active(clamp_top_p, clamp_top_k):
            if backend == "torch":
                entropy = reference_clamped_entropy(flat_logits, flat_targets, top_p=clamp_top_p, top_k=clamp_top_k,
                                                    temperature=temperature, ignore_index=ignore_index)
            else:
                entropy = clamped_logits_entropy(flat_logits, flat_targets, temperature, ignore_index, clamp_top_p,
                                                 clamp_top_k)
            stats = stats._replace(entropy=entropy)
    return TokenStats(*(None if t is None else t.reshape(lead) for t in stats))


def logprob_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    clamp_top_p: float | None = None,
    clamp_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(logits / T)[target]`` and entropy of ``softmax(logits / T)``, shaped like ``targets``
    (the clamped entropy with ``clamp_top_p`` / ``clamp_top_k``)."""
    stats = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index, backend=backend,
                        clamp_top_p=clamp_top_p, clamp_top_k=clamp_top_k)
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
    clamp_top_p: float | None = None,
    clamp_top_k: int | None = None,
) -> TokenStats:
    """:func:`linear_logprob_and_entropy` plus the no-grad extras; ``clamp_top_p`` / ``clamp_top_k`` as in
    :func:`token_stats` (the clamped entropy runs on the chunked path; the Triton head keeps the log-probs)."""
    compute_dtype = check_linear(hidden, weight, bias, targets, temperature, ignore_index)
    check_clamp(clamp_top_p, clamp_top_k)
    extras = check_extras(extras)
    backend = resolve_backend(backend, hidden.device)
    stats = _linear_stats(hidden, weight, bias, targets, temperature, ignore_index, extras, backend, compute_dtype)
    if not clamp_active(clamp_top_p, clamp_top_k):
        return stats
    if backend == "torch":
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden.to(compute_dtype).float() @ weight.to(compute_dtype).float().t()
            logits = logits if bias is None else logits + bias.to(compute_dtype).float()
            entropy = reference_clamped_entropy(logits, targets, top_p=clamp_top_p, top_k=clamp_top_k,
                                                temperature=temperature, ignore_index=ignore_index)
    else:
        entropy = clamped_linear_entropy(hidden, weight, bias, targets, temperature, ignore_index, clamp_top_p,
                                         clamp_top_k, compute_dtype)
    return stats._replace(entropy=entropy)


def _linear_stats(hidden, weight, bias, targets, temperature, ignore_index, extras, backend, compute_dtype):
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
    clamp_top_p: float | None = None,
    clamp_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head: per-token log-prob and entropy of ``softmax((hidden @ weight.T + bias) / T)``.

    ``hidden [N, d]``, ``weight [V, d]``, ``bias [V]`` or None, ``targets [N]``. Gradients flow to hidden, weight and
    bias; the ``[N, V]`` logits are never materialized whole (except with ``backend="torch"``). With
    ``clamp_top_p`` / ``clamp_top_k`` the entropy is the clamped one.
    """
    stats = linear_token_stats(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, backend=backend,
        clamp_top_p=clamp_top_p, clamp_top_k=clamp_top_k,
    )
    return stats.logprobs, stats.entropy
