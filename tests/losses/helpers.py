"""Shared helpers of the losses tests: float64 tensors and a finiteness check."""

from __future__ import annotations

import torch

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def t(x, dtype=F64, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def finite(*ts):
    return all(bool(torch.isfinite(x).all()) for x in ts)
