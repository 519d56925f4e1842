"""Shared types, input checks and backend resolution for the log-prob + entropy ops (no kernels here)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

BACKENDS = ("auto", "torch", "chunked", "triton")
#: Per-token outputs besides log-prob and entropy that a caller may ask for. They carry no gradient.
EXTRA_OUTPUTS = ("mean_logits", "is_top1", "log_sum_sq_probs")


class TokenStats(NamedTuple):
    """Per-token statistics of the temperature-scaled next-token distribution, all shaped like the targets.

    ``logprobs`` and ``entropy`` are float32 and differentiable; the extras are ``None`` unless requested, and
    carry no gradient. Every field is 0 (``False`` for ``is_top1``) where the target equals ``ignore_index``.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def check_extras(extras: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    extras = tuple(extras)
    unknown = [e for e in extras if e not in EXTRA_OUTPUTS]
    if unknown:
        raise ValueError(f"extras: unknown output(s) {unknown}; choose from {EXTRA_OUTPUTS}")
    return extras


def gathered_params(*params: torch.Tensor | None):
    """Context that all-gathers DeepSpeed ZeRO-3 partitioned parameters (no-op without ZeRO-3).

    Kernels read ``lm_head.weight`` directly instead of calling the module, so ZeRO-3's module hooks never
    gather it; the forward and the backward (which recomputes logits) must each gather it themselves.
    """
    to_gather = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not to_gather:
        return nullcontext()
    import deepspeed  # imported only when a partitioned parameter is seen
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    unique = {id(p): p for p in to_gather if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not unique:
        return nullcontext()
    return deepspeed.zero.GatheredParameters(list(unique.values()), modifier_rank=None)


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


def _check_targets(targets: torch.Tensor, n_vocab: int, device: torch.device, temperature: float, ignore_index: int):
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
        if torch.compiler.is_compiling():  # no branch on tensor data in a graph: an assertion op in it instead
            torch._assert_async(~bad.any(), f"targets: a value is outside [0, {n_vocab}) and is not "
                                            f"ignore_index={ignore_index}")
            return
        if bool(bad.any()):
            value = int(targets[bad].flatten()[0])
            raise ValueError(
                f"targets: value {value} is outside [0, {n_vocab}) and is not ignore_index={ignore_index}"
            )


def check_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int):
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} does not match logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    _check_targets(targets, logits.shape[-1], logits.device, temperature, ignore_index)


def check_linear(hidden, weight, bias, targets, temperature, ignore_index) -> torch.dtype:
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
    _check_targets(targets, weight.shape[0], hidden.device, temperature, ignore_index)
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one, or run under torch.autocast"
        )
    return hidden.dtype
