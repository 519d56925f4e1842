"""Clamped entropy: the entropy of the next-token distribution restricted to its top-p / top-k head and
renormalised, with its exact gradient, over vocabulary tiles (the ``[N, V]`` logits are never held whole).

Forward: a pass for every row's running top-K logits and log-sum-exp (K grows for rows whose head needs more), the
cut from the sorted candidates, a pass for the statistics over the kept set; backward: one pass recomputing the
logits. The math and the tie rule (every token tied at the cut is kept): docs/formulations.md ("Clamped entropy").
"""

from __future__ import annotations

from typing import Callable

import torch

from ._common import gathered_params
from ._tiles import addmm_f32, logits_tile
from .chunked import chunk_sizes

#: Candidates per row in the first pass of a top-p clamp without top-k; doubled for rows whose head needs more.
TOP_P_CANDIDATES = 256

#: ``tiles(rows)`` -> ``tile(v0, v1)``: the scaled-logit tiles of ``rows`` (a slice, or an index tensor).
Tiles = Callable[[object], Callable[[int, int], torch.Tensor]]


def check_clamp(top_p: float | None, top_k: int | None) -> None:
    """Refuse a top-p outside (0, 1] or a top-k below 1, naming the argument."""
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"clamp_top_p: expected a probability in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or int(top_k) < 1):
        raise ValueError(f"clamp_top_k: expected an integer >= 1, got {top_k!r}")


def clamp_active(top_p: float | None, top_k: int | None) -> bool:
    """Whether the clamp changes anything (top-p 1 alone keeps the whole vocabulary)."""
    return top_k is not None or (top_p is not None and float(top_p) < 1.0)


def _candidates(tile, n: int, n_vocab: int, k: int, vc: int, device):
    """Every row's ``k`` largest scaled logits (sorted, descending) and its log-sum-exp over the vocabulary."""
    cand = torch.full((n, 0), float("-inf"), device=device)
    m = torch.full((n,), float("-inf"), device=device)
    s = torch.zeros(n, device=device)
    for v0 in range(0, n_vocab, vc):
        u = tile(v0, min(v0 + vc, n_vocab))
        cand = torch.cat([cand, u], 1)
        cand = cand.topk(min(k, cand.shape[1]), dim=1).values
        new_m = torch.maximum(m, u.max(1).values)
        safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
        decay = torch.exp(torch.where(torch.isfinite(m), m - safe, torch.full_like(m, float("-inf"))))
        s = s * decay + torch.exp(u - safe.unsqueeze(1)).sum(1)
        m = new_m
    return cand, m + torch.log(s)


def _set_sums(tile, n_vocab: int, cut: torch.Tensor, shift: torch.Tensor, vc: int):
    """``(Σ_S e^(u - shift), Σ_S e^(u - shift) (u - shift))`` over the kept set ``S = {u >= cut, u finite}``."""
    s = torch.zeros(cut.shape[0], device=cut.device)
    t = torch.zeros_like(s)
    for v0 in range(0, n_vocab, vc):
        u = tile(v0, min(v0 + vc, n_vocab))
        keep = (u >= cut.unsqueeze(1)) & torch.isfinite(u)
        d = torch.where(keep, u - shift.unsqueeze(1), torch.zeros_like(u))
        e = torch.where(keep, torch.exp(d), torch.zeros_like(u))
        s += e.sum(1)
        t += (e * d).sum(1)
    return s, t


def _first_reaching(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first sorted candidate whose running mass reaches ``top_p``, and whether one does."""
    reached = probs.cumsum(1) >= top_p
    return reached.float().argmax(1), reached.any(1)


def _cut(tiles: Tiles, n: int, n_vocab: int, top_p, top_k, vc: int, device):
    """``(cut, row max)``: the smallest kept scaled logit of every row (``S = {u >= cut}``) and the largest."""
    tile = tiles(slice(0, n))
    if top_k is not None:
        k = min(int(top_k), n_vocab)
        cand, _ = _candidates(tile, n, n_vocab, k, vc, device)
        cut, top = cand[:, k - 1], cand[:, 0]
        if top_p is None or float(top_p) >= 1.0:
            return cut, top
        z_k, _ = _set_sums(tile, n_vocab, cut, top, vc)  # the top-k mass, ties at the cut included
        idx, found = _first_reaching(torch.exp(cand - top.unsqueeze(1)) / z_k.unsqueeze(1), float(top_p))
        # not reached within the k candidates: the rest of the mass is tied at the cut, which is then the cut
        return torch.where(found, cand.gather(1, idx.unsqueeze(1)).squeeze(1), cut), top
    cut = torch.empty(n, device=device)
    top = torch.empty(n, device=device)
    todo = torch.arange(n, device=device)
    k = min(TOP_P_CANDIDATES, n_vocab)
    while todo.numel():
        cand, lse = _candidates(tiles(todo), todo.numel(), n_vocab, k, vc, device)
        idx, found = _first_reaching(torch.exp(cand - lse.unsqueeze(1)), float(top_p))
        done = found | (k >= n_vocab)  # the whole vocabulary: its mass is 1 up to rounding
        idx = torch.where(found, idx, torch.full_like(idx, cand.shape[1] - 1))
        cut[todo[done]] = cand.gather(1, idx.unsqueeze(1)).squeeze(1)[done]
        top[todo[done]] = cand[done, 0]
        todo, k = todo[~done], min(2 * k, n_vocab)
    return cut, top


def clamped_entropy_forward(tiles: Tiles, n_rows: int, n_vocab: int, top_p, top_k, tc: int, vc: int, device):
    """``(H_S, cut, lse_S)`` per row (fp32)."""
    h = torch.zeros(n_rows, device=device)
    cut = torch.zeros(n_rows, device=device)
    lse = torch.zeros(n_rows, device=device)
    for r0 in range(0, n_rows, tc):
        r1 = min(r0 + tc, n_rows)
        chunk = _sub_tiles(tiles, r0, r1)
        c, top = _cut(chunk, r1 - r0, n_vocab, top_p, top_k, vc, device)
        s, t = _set_sums(chunk(slice(0, r1 - r0)), n_vocab, c, top, vc)
        cut[r0:r1], lse[r0:r1], h[r0:r1] = c, top + torch.log(s), torch.log(s) - t / s
    return h, cut, lse


def _sub_tiles(tiles: Tiles, r0: int, r1: int) -> Tiles:
    """The tiles of rows ``r0 .. r1``, addressed relative to ``r0``."""
    def sub(rows):
        if isinstance(rows, slice):
            return tiles(slice(r0 + rows.start, r0 + rows.stop))
        return tiles(rows + r0)
    return sub


def clamped_entropy_backward(tiles: Tiles, consume, n_rows: int, n_vocab: int, cut, lse, h, grad, inv_t: float,
                             tc: int, vc: int) -> None:
    """Hand ``consume(dz, r0, r1, v0, v1)`` the gradient of ``Σ_rows grad · H_S`` w.r.t. each raw logits tile."""
    for r0 in range(0, n_rows, tc):
        r1 = min(r0 + tc, n_rows)
        tile = tiles(slice(r0, r1))
        c, l, hh = cut[r0:r1, None], lse[r0:r1, None], h[r0:r1, None]
        g = grad[r0:r1, None] * inv_t
        for v0 in range(0, n_vocab, vc):
            v1 = min(v0 + vc, n_vocab)
            u = tile(v0, v1)
            keep = (u >= c) & torch.isfinite(u)
            d = torch.where(keep, u - l, torch.zeros_like(u))
            q = torch.where(keep, torch.exp(d), torch.zeros_like(u))
            consume(-g * q * (d + hh), r0, r1, v0, v1)


class _ClampedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, valid, temperature, top_p, top_k, compute_dtype, tc, vc):
        index = torch.nonzero(valid).squeeze(1)
        tc, vc = chunk_sizes(hidden.device, tc, vc)
        with gathered_params(weight, bias), torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            tiles = _linear_tiles(*_operands(hidden, weight, bias, index, compute_dtype), 1.0 / temperature)
            h, cut, lse = clamped_entropy_forward(tiles, index.shape[0], weight.shape[0], top_p, top_k, tc, vc,
                                                  hidden.device)
        ctx.save_for_backward(hidden, weight, bias, index, h, cut, lse)
        ctx.cfg = (1.0 / temperature, compute_dtype, tc, vc)
        return torch.zeros(hidden.shape[0], device=hidden.device).index_copy(0, index, h)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, index, h, cut, lse = ctx.saved_tensors
        inv_t, compute_dtype, tc, vc = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev = hidden.device
        gb = torch.zeros(weight.shape[0], device=dev) if (need_b and bias is not None) else None
        with gathered_params(weight, bias), torch.no_grad(), torch.autocast(dev.type, enabled=False):
            h_rows, w, b = _operands(hidden, weight, bias, index, compute_dtype)
            gh = torch.zeros(h_rows.shape, device=dev) if need_h else None
            gw = torch.zeros(w.shape, device=dev) if need_w else None

            def consume(dz, r0, r1, v0, v1):
                if gb is not None:
                    gb[v0:v1] += dz.sum(0)
                dz = dz.to(compute_dtype)
                if gh is not None:
                    addmm_f32(gh[r0:r1], dz, w[v0:v1])
                if gw is not None:
                    addmm_f32(gw[v0:v1], dz.t(), h_rows[r0:r1])

            clamped_entropy_backward(_linear_tiles(h_rows, w, b, inv_t), consume, index.shape[0], w.shape[0], cut,
                                     lse, h, grad.float().index_select(0, index), inv_t, tc, vc)
        grad_hidden = None
        if gh is not None:
            grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            grad_hidden.index_copy_(0, index, gh.to(hidden.dtype))
        return (grad_hidden, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
                None, None, None, None, None, None, None)


def _operands(hidden, weight, bias, index, compute_dtype):
    """The labelled rows of ``hidden``, the weight and the bias, in the compute dtype."""
    b = None if bias is None else bias.to(compute_dtype)
    return hidden.index_select(0, index).to(compute_dtype), weight.to(compute_dtype), b


def _linear_tiles(h_rows, w, b, inv_t: float) -> Tiles:
    def tiles(rows):
        block = h_rows[rows]
        return lambda v0, v1: logits_tile(block, w[v0:v1], None if b is None else b[v0:v1]).float() * inv_t

    return tiles


def _logits_tiles(logits, index, inv_t: float) -> Tiles:
    def tiles(rows):
        block = logits[index[rows]]
        return lambda v0, v1: block[:, v0:v1].float() * inv_t

    return tiles


class _ClampedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, valid, temperature, top_p, top_k, tc, vc):
        index = torch.nonzero(valid).squeeze(1)
        tc, vc = chunk_sizes(logits.device, tc, vc)
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            h, cut, lse = clamped_entropy_forward(_logits_tiles(logits, index, 1.0 / temperature), index.shape[0],
                                                  logits.shape[1], top_p, top_k, tc, vc, logits.device)
        ctx.save_for_backward(logits, index, h, cut, lse)
        ctx.cfg = (1.0 / temperature, tc, vc)
        return torch.zeros(logits.shape[0], device=logits.device).index_copy(0, index, h)

    @staticmethod
    def backward(ctx, grad):
        logits, index, h, cut, lse = ctx.saved_tensors
        inv_t, tc, vc = ctx.cfg
        out = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)

        def consume(dz, r0, r1, v0, v1):
            out[index[r0:r1], v0:v1] = dz.to(out.dtype)

        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            clamped_entropy_backward(_logits_tiles(logits, index, inv_t), consume, index.shape[0], logits.shape[1],
                                     cut, lse, h, grad.float().index_select(0, index), inv_t, tc, vc)
        return (out, None, None, None, None, None, None)


def clamped_linear_entropy(hidden, weight, bias, targets, temperature: float, ignore_index: int, top_p, top_k,
                           compute_dtype=None, token_chunk: int | None = None, vocab_chunk: int | None = None):
    """Clamped entropy of ``softmax((hidden @ weight.T + bias) / T)`` per row ``[N]`` (0 where ignored)."""
    return _ClampedLinear.apply(hidden, weight, bias, targets != ignore_index, float(temperature), top_p, top_k,
                                compute_dtype or hidden.dtype, token_chunk, vocab_chunk)


def clamped_logits_entropy(logits, targets, temperature: float, ignore_index: int, top_p, top_k,
                           token_chunk: int | None = None, vocab_chunk: int | None = None):
    """Clamped entropy of ``softmax(logits / T)`` per row of ``logits [N, V]`` (0 where ignored)."""
    return _ClampedLogits.apply(logits, targets != ignore_index, float(temperature), top_p, top_k, token_chunk,
                                vocab_chunk)
