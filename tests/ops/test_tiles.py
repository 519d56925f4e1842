"""The shared tile helpers (``ops/_tiles.py``): fp32 logits tiles from half-precision operands, fp32-accumulating
GEMMs, and the per-tile gradient ``dz`` against autograd in float64."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.ops._tiles import NEG_BIG, addmm_f32, grad_tile, logits_tile, mm_out_dtype_available


def test_logits_tile_keeps_fp32_from_half_operands():
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(7, 33, generator=gen) * 3).bfloat16()
    w = (torch.randn(11, 33, generator=gen) * 3).bfloat16()
    b = torch.randn(11, generator=gen).bfloat16()
    z = logits_tile(h, w, b)
    assert z.dtype == torch.float32
    exact = h.double() @ w.double().t() + b.double()
    assert (z.double() - exact).abs().max() < 1e-4  # fp32 accumulation of exact products
    rounded = (h @ w.t() + b).double()  # what a bf16 result would give
    assert (rounded - exact).abs().max() > 1e-2
    buf = torch.empty(7, 11)
    out = logits_tile(h, w, None, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out.double(), h.double() @ w.double().t(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_tile_full_precision_operands_stay_in_their_dtype(dtype):
    h, w, b = torch.randn(3, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype), torch.randn(5, dtype=dtype)
    z = logits_tile(h, w, b)
    assert z.dtype == dtype
    torch.testing.assert_close(z, h @ w.t() + b)


def test_addmm_f32_accumulates_half_products_in_fp32():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 40, generator=gen).bfloat16()
    b = torch.randn(40, 9, generator=gen).bfloat16()
    acc = torch.randn(6, 9, generator=gen)
    expected = acc.double() + a.double() @ b.double()
    addmm_f32(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), expected, atol=1e-5, rtol=1e-6)


def test_mm_out_dtype_flag_is_a_bool():
    assert isinstance(mm_out_dtype_available(), bool)


@pytest.mark.parametrize("with_g_h", [True, False])
@pytest.mark.parametrize("inv_t", [1.0, 1 / 1.7])
def test_grad_tile_matches_autograd(with_g_h, inv_t):
    """A tile holding columns [v0, v0 + v) of a V-column row: dz of ``sum g_lp lp + g_H H`` w.r.t. the raw logits."""
    gen = torch.Generator().manual_seed(2)
    n, n_vocab, v0, v = 5, 23, 8, 10
    raw = (torch.randn(n, n_vocab, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    raw_inf = raw.detach().clone()
    raw_inf[:, 12] = float("-inf")  # a masked column inside the tile
    raw_inf.requires_grad_(True)
    targets = torch.tensor([9, 0, 15, 17, 22])  # in the tile, before it, in it, in it, after it
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_h = torch.randn(n, generator=gen, dtype=torch.float64) if with_g_h else None
    z = raw_inf * inv_t
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    entropy = lse - (p * torch.where(torch.isfinite(z), z, torch.zeros_like(z))).sum(-1)
    lp = z.gather(1, targets[:, None]).squeeze(1) - lse
    total = (g_lp * lp).sum() + ((g_h * entropy).sum() if with_g_h else 0)
    (expected,) = torch.autograd.grad(total, [raw_inf])
    tile = (raw_inf.detach()[:, v0 : v0 + v] * inv_t).clone()
    dz = grad_tile(tile, targets - v0, lse.detach(), entropy.detach(), g_lp, g_h, inv_t, guard=True)
    torch.testing.assert_close(dz, expected[:, v0 : v0 + v], atol=1e-12, rtol=1e-10)
    assert (dz[:, 12 - v0] == 0).all()  # a -inf logit gets no gradient
    assert NEG_BIG < -1e29
