"""Per-token log-prob + entropy ops: one dispatch point over the backends.

``logprob_and_entropy`` works on materialized logits ``[..., V]``; ``linear_logprob_and_entropy`` is the fused
LM head (``hidden [N, d]``, ``weight [V, d]``) that never holds the ``[N, V]`` logits whole. Backends:

- ``"torch"``: plain reference path (materializes everything, float32 math);
- ``"chunked"``: torch, tiles over tokens and vocabulary with an online single pass; CPU and GPU;
- ``"triton"``: Triton kernels (one on logits, one fused with the LM head);
- ``"auto"``: Triton on CUDA, chunked elsewhere.

Per-token outputs are float32. Both outputs are differentiable, each with its own upstream gradient; an output
whose gradient is not needed costs no backward work. Positions whose target is ``ignore_index`` give 0 and get zero
gradient. Bad input raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch

from ._common import EXTRA_OUTPUTS, TokenStats, check_extras, gathered_params
from .reference import reference_linear_token_stats, reference_token_stats
from .hf_head import install_fused_head
from .fused_loss import fused_linear_loss, ppo_clip_token_loss

BACKENDS = ("auto", "torch", "chunked", "triton")

__all__ = [
    "BACKENDS",
    "EXTRA_OUTPUTS",
    "TokenStats",
    "fused_linear_loss",
    "ppo_clip_token_loss",
    "gathered_params",
    "install_fused_head",
    "linear_logprob_and_entropy",
    "linear_token_stats",
    "logprob_and_entropy",
    "token_stats",
    "resolve_backend",
]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means on ``device`` (``"auto"`` -> triton on CUDA, chunked elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if backend == "triton" and not triton_available():
        raise ValueError("backend: 'triton' requested but triton is not importable on this platform")
    return backend


def _check_common(targets: torch.Tensor, n_vocab: int, device: torch.device, temperature: float, ignore_index: int):
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.device != device:
        raise ValueError(f"targets: on {targets.device}, but the logits/hidden are on {device}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if 0 <= ignore_index < n_vocab:
        raise ValueError(f"ignore_index: {ignore_index} is a valid token id for a vocabulary of {n_vocab}")
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_vocab))
        if bool(bad.any()):
            value = int(targets[bad].flatten()[0])
            raise ValueError(
                f"targets: value {value} is outside [0, {n_vocab}) and is not ignore_index={ignore_index}"
            )


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int):
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} does not match logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    _check_common(targets, logits.shape[-1], logits.device, temperature, ignore_index)


def _check_linear(hidden, weight, bias, targets, temperature, ignore_index) -> torch.dtype:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D floating-point tensor, got "
                f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}"
            )
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} must be [V, d] with d = hidden.shape[1] = {hidden.shape[1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary is empty (a ZeRO-3 partitioned weight must be gathered first)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise ValueError(f"bias: expected a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: shape {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
        if bias.device != hidden.device:
            raise ValueError(f"bias: on {bias.device}, but hidden is on {hidden.device}")
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets: shape {tuple(targets.shape)} must be [N] = [{hidden.shape[0]}]")
    _check_common(targets, weight.shape[0], hidden.device, temperature, ignore_index)
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one, or run under torch.autocast"
        )
    return hidden.dtype


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
    _check_logits(logits, targets, temperature, ignore_index)
    extras = check_extras(extras)
    backend = resolve_backend(backend, logits.device)
    lead = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if backend == "torch":
        stats = reference_token_stats(
            flat_logits, flat_targets, temperature=temperature, ignore_index=ignore_index, extras=extras
        )
    elif backend == "chunked":
        from .chunked import chunked_token_stats

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
    compute_dtype = _check_linear(hidden, weight, bias, targets, temperature, ignore_index)
    extras = check_extras(extras)
    backend = resolve_backend(backend, hidden.device)
    if backend == "torch":
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
        from .chunked import chunked_linear_token_stats as impl
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
