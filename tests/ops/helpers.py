"""Shared helpers of the ops tests: tolerances, random targets with ignored positions, gradients of a weighted sum."""

from __future__ import annotations

import torch

EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")


def tolerance(dtype):
    return dict(atol=5e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=2e-5, rtol=2e-5)


def make_targets(gen, shape, n_vocab, ignore_frac=0.2, low=0):
    targets = torch.randint(low, n_vocab, shape, generator=gen)
    ignore = torch.rand(shape, generator=gen) < ignore_frac
    return targets.masked_fill(ignore, -100)


def grads_of(stats_lp, stats_h, inputs, g_lp, g_h):
    loss = (stats_lp * g_lp.to(stats_lp.dtype)).sum()
    if g_h is not None:
        loss = loss + (stats_h * g_h.to(stats_h.dtype)).sum()
    return torch.autograd.grad(loss, inputs)
