"""Shared types and small helpers for the log-prob + entropy ops (no kernels here)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

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
