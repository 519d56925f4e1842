"""Chunked log-prob + entropy in plain torch: tiles over tokens x vocabulary, one online pass (CPU and GPU).

Only ``(lse, H)`` per token is saved; the backward recomputes each tile. Ignored positions are compacted away first;
``-inf`` guards are on only when the input can hold one. The online update and the backward: docs/kernels.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._common import TokenStats, gathered_params
from ._tiles import NEG_BIG, addmm_f32, grad_tile, logits_tile

#: Default tile sizes. Tokens x vocabulary fp32 tile on the CPU: 1024 x 4096 x 4 B = 16 MiB. A 32 MiB tile sits at
#: glibc's largest mmap threshold, so each tile-sized temporary is a fresh mmap (page faults + zeroing); 16 MiB
#: tiles reuse freed heap memory: 0.57x TRL's fwd+bwd time vs 0.63x at 1024 x 8192 (docs/benchmarks.md, run 2).
TOKEN_CHUNK = {"cpu": 1024, "cuda": 4096}
VOCAB_CHUNK = {"cpu": 4096, "cuda": 32768}


def chunk_sizes(device: torch.device, token_chunk: int | None, vocab_chunk: int | None) -> tuple[int, int]:
    """``(token chunk, vocabulary chunk)``: the given ones, else the defaults for the device."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return token_chunk or TOKEN_CHUNK[kind], vocab_chunk or VOCAB_CHUNK[kind]


class _Running:
    """Online statistics of one token chunk (all fp32 vectors of length n)."""

    def __init__(self, n: int, device: torch.device, extras: tuple[str, ...]):
        f32 = dict(device=device, dtype=torch.float32)
        self.m = torch.full((n,), float("-inf"), **f32)
        self.s = torch.zeros(n, **f32)
        self.t = torch.zeros(n, **f32)  # shifted statistic T' = sum exp(z - m) (z - m)
        self.target_z = torch.zeros(n, **f32)
        self.z_sum = torch.zeros(n, **f32) if "mean_logits" in extras else None
        self.q = torch.zeros(n, **f32) if "log_sum_sq_probs" in extras else None
        if "is_top1" in extras:
            self.best = torch.full((n,), float("-inf"), **f32)
            self.best_idx = torch.zeros(n, device=device, dtype=torch.long)
        else:
            self.best = self.best_idx = None

    def fold(self, z: torch.Tensor, local_targets: torch.Tensor, v0: int, guard: bool) -> None:
        """Fold an fp32 tile ``z [n, v]`` (columns ``v0 .. v0+v``) into the statistics. ``z`` is overwritten."""
        n, v = z.shape
        in_tile = (local_targets >= 0) & (local_targets < v)
        picked = z.gather(1, local_targets.clamp(0, v - 1).unsqueeze(1)).squeeze(1)
        self.target_z = torch.where(in_tile, picked, self.target_z)
        if self.z_sum is not None:
            self.z_sum += z.sum(1)
        blk_max, blk_arg = z.max(1)
        if self.best is not None:
            better = blk_max > self.best  # strict: the first maximum over the vocabulary wins ties
            self.best = torch.where(better, blk_max, self.best)
            self.best_idx = torch.where(better, blk_arg + v0, self.best_idx)
        new_m = torch.maximum(self.m, blk_max)
        # A row whose columns so far are all -inf keeps m = -inf; shift by 0 there so nothing becomes NaN.
        shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
        old = torch.where(torch.isfinite(self.m), self.m - shift, torch.full_like(new_m, float("-inf")))
        c = torch.exp(old)  # 0 where nothing was accumulated yet
        old_finite = torch.where(torch.isfinite(old), old, torch.zeros_like(old))
        z.sub_(shift.unsqueeze(1))  # z - m' (-inf stays -inf)
        if guard:
            z.clamp_(min=NEG_BIG)
        e = torch.exp(z)
        blk_s = e.sum(1)
        blk_t = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(n)  # one fused pass: sum_i e_i (z_i - m')
        self.t = c * (self.t + old_finite * self.s) + blk_t
        if self.q is not None:
            self.q = c * c * self.q + torch.bmm(e.unsqueeze(1), e.unsqueeze(2)).view(n)
        self.s = c * self.s + blk_s
        self.m = new_m

    def finish(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        log_s = torch.log(self.s)
        lse = self.m + log_s
        out = {"logprobs": self.target_z - lse, "entropy": log_s - self.t / self.s, "lse": lse}
        if self.z_sum is not None:
            out["z_sum"] = self.z_sum
        if self.q is not None:
            out["log_sum_sq_probs"] = torch.log(self.q) - 2 * log_s
        if self.best is not None:
            out["is_top1"] = self.best_idx == targets
        return out


def _forward(
    n_rows: int,
    n_vocab: int,
    tile_fn: Callable[[int, int, int, int], torch.Tensor],
    targets: torch.Tensor,
    inv_t: float,
    extras: tuple[str, ...],
    guard: bool,
    token_chunk: int,
    vocab_chunk: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    parts: list[dict[str, torch.Tensor]] = []
    for r0 in range(0, n_rows, token_chunk):
        r1 = min(r0 + token_chunk, n_rows)
        run = _Running(r1 - r0, device, extras)
        tgt = targets[r0:r1]
        for v0 in range(0, n_vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, n_vocab)
            z = tile_fn(r0, r1, v0, v1).float()  # a fresh tile: safe to overwrite
            if inv_t != 1.0:
                z.mul_(inv_t)
            run.fold(z, tgt - v0, v0, guard)
        parts.append(run.finish(tgt))
    if not parts:
        empty = torch.zeros(0, device=device, dtype=torch.float32)
        return {"logprobs": empty, "entropy": empty, "lse": empty, "z_sum": empty, "log_sum_sq_probs": empty,
                "is_top1": torch.zeros(0, device=device, dtype=torch.bool)}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _backward(
    n_rows: int,
    n_vocab: int,
    tile_fn: Callable[[int, int, int, int], torch.Tensor],
    consume: Callable[[torch.Tensor, int, int, int, int], None],
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_h: torch.Tensor | None,
    inv_t: float,
    guard: bool,
    token_chunk: int,
    vocab_chunk: int,
) -> None:
    for r0 in range(0, n_rows, token_chunk):
        r1 = min(r0 + token_chunk, n_rows)
        for v0 in range(0, n_vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, n_vocab)
            z = tile_fn(r0, r1, v0, v1).float()  # a fresh tile: safe to overwrite
            if inv_t != 1.0:
                z.mul_(inv_t)
            dz = grad_tile(
                z,
                targets[r0:r1] - v0,
                lse[r0:r1],
                entropy[r0:r1],
                None if g_lp is None else g_lp[r0:r1],
                None if g_h is None else g_h[r0:r1],
                inv_t,
                guard,
            )
            consume(dz, r0, r1, v0, v1)


class _Rows(NamedTuple):
    """The rows an op works on. Eager: the valid rows, compacted (``index``), so ignored rows cost nothing. Under
    ``torch.compile``: every row (``index`` None; a data-dependent compaction would break the graph), the ignored
    ones masked by ``valid``."""

    index: torch.Tensor | None
    valid: torch.Tensor
    count: int

    @classmethod
    def of(cls, targets: torch.Tensor, ignore_index: int) -> "_Rows":
        valid = targets != ignore_index
        if torch.compiler.is_compiling():
            return cls(None, valid, targets.shape[0])
        index = torch.nonzero(valid).squeeze(1)
        return cls(index, valid, index.shape[0])

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The worked-on rows of a per-row tensor (ignored rows zeroed when not compacted)."""
        if self.index is not None:
            return x.index_select(0, self.index)
        return torch.where(self.valid.reshape(-1, *([1] * (x.ndim - 1))), x, torch.zeros((), dtype=x.dtype,
                                                                                           device=x.device))

    def span(self, r0: int, r1: int):
        """Positions of worked-on rows ``r0 .. r1`` in the full tensor (an index tensor, or a slice)."""
        return slice(r0, r1) if self.index is None else self.index[r0:r1]

    def place_rows(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Worked-on rows ``x [count, ...]`` back in a tensor shaped like ``like``, 0 at ignored rows."""
        if self.index is None:
            return x
        full = torch.zeros(like.shape, dtype=x.dtype, device=x.device)
        return full.index_copy_(0, self.index, x) if self.count else full

    def place(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Per-row results back at their positions, 0 (False) at ignored ones."""
        if self.index is None:
            return torch.where(self.valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        full = x.new_zeros(n)
        return full.index_copy(0, self.index, x) if self.count else full


def _may_hold_neg_inf(x: torch.Tensor | None) -> bool:
    """Whether the ``-inf`` guards are needed; always on under ``torch.compile`` (they change no finite result)."""
    if x is None:
        return False
    return True if torch.compiler.is_compiling() else bool(torch.isneginf(x).any())


def _scatter_stats(out: dict[str, torch.Tensor], rows: _Rows, n: int, extras, n_vocab: int):
    """Place the per-row results back at their positions (zeros at ignored ones)."""
    stats = {"logprobs": rows.place(out["logprobs"], n), "entropy": rows.place(out["entropy"], n)}
    if "mean_logits" in extras:
        stats["mean_logits"] = rows.place(out["z_sum"] / n_vocab, n)
    if "is_top1" in extras:
        stats["is_top1"] = rows.place(out["is_top1"], n)
    if "log_sum_sq_probs" in extras:
        stats["log_sum_sq_probs"] = rows.place(out["log_sum_sq_probs"], n)
    return stats


def _saved_rows(ctx, rows: _Rows) -> torch.Tensor:
    ctx.compacted = rows.index is not None
    return rows.index if rows.index is not None else rows.valid


def _restored_rows(ctx, saved: torch.Tensor, n: int) -> _Rows:
    if ctx.compacted:
        return _Rows(saved, torch.ones((), dtype=torch.bool, device=saved.device), saved.shape[0])
    return _Rows(None, saved, n)


def _grads_of_rows(rows: _Rows, g_lp: torch.Tensor | None, g_h: torch.Tensor | None):
    """The upstream gradients of the worked-on rows, in fp32 (0 at ignored rows when not compacted)."""
    return (None if g_lp is None else rows.take(g_lp.float()), None if g_h is None else rows.take(g_h.float()))


class _ChunkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, extras, compute_dtype, tc, vc):
        ctx.set_materialize_grads(False)
        n, n_vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        rows = _Rows.of(targets, ignore_index)
        h = rows.take(hidden).to(compute_dtype)
        tgt = rows.take(targets).long()
        inv_t = 1.0 / temperature
        guard = _may_hold_neg_inf(bias)
        tc, vc = chunk_sizes(device, tc, vc)
        w = weight.to(compute_dtype) if weight.dtype != compute_dtype else weight
        b = None if bias is None else bias.to(compute_dtype)

        def tile(r0, r1, v0, v1):
            return logits_tile(h[r0:r1], w[v0:v1], None if b is None else b[v0:v1])

        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out = _forward(rows.count, n_vocab, tile, tgt, inv_t, extras, guard, tc, vc, device)
            stats = _scatter_stats(out, rows, n, extras, n_vocab)
        ctx.save_for_backward(hidden, weight, bias, _saved_rows(ctx, rows), tgt, out["lse"], out["entropy"])
        ctx.cfg = (inv_t, compute_dtype, guard, tc, vc)
        extra_out = [stats[k] for k in ("mean_logits", "is_top1", "log_sum_sq_probs") if k in stats]
        ctx.mark_non_differentiable(*extra_out)
        return (stats["logprobs"], stats["entropy"], *extra_out)

    @staticmethod
    def backward(ctx, g_lp, g_h, *_unused):
        hidden, weight, bias, saved_rows, tgt, lse, entropy = ctx.saved_tensors
        inv_t, compute_dtype, guard, tc, vc = ctx.cfg
        rows = _restored_rows(ctx, saved_rows, hidden.shape[0])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (g_lp is None and g_h is None) or not (need_h or need_w or need_b) or rows.count == 0:
            zeros = tuple(
                torch.zeros_like(x) if (x is not None and need) else None
                for x, need in ((hidden, need_h), (weight, need_w), (bias, need_b))
            )
            return (*zeros, *(None,) * 7)
        g_lp, g_h = _grads_of_rows(rows, g_lp, g_h)
        with gathered_params(weight, bias), torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            gh, gw, gb = _linear_backward(hidden, weight, bias, rows, tgt, lse, entropy, g_lp, g_h, ctx.cfg,
                                          (need_h, need_w, need_b and bias is not None))
        grad_hidden = None if gh is None else rows.place_rows(gh.to(hidden.dtype), hidden)
        return (
            grad_hidden,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None, None, None, None, None, None, None,
        )


def _linear_backward(hidden, weight, bias, rows: _Rows, tgt, lse, entropy, g_lp, g_h, cfg, need):
    """``(grad_hidden of the worked-on rows, grad_weight, grad_bias)`` in fp32 (None where not needed)."""
    inv_t, compute_dtype, guard, tc, vc = cfg
    need_h, need_w, need_b = need
    n_vocab = weight.shape[0]
    h = rows.take(hidden).to(compute_dtype)
    w = weight.to(compute_dtype) if weight.dtype != compute_dtype else weight
    b = None if bias is None else bias.to(compute_dtype)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    gh = torch.zeros(h.shape, **f32) if need_h else None
    gw = torch.zeros(weight.shape, **f32) if need_w else None
    gb = torch.zeros(n_vocab, **f32) if need_b else None

    def tile(r0, r1, v0, v1):
        return logits_tile(h[r0:r1], w[v0:v1], None if b is None else b[v0:v1])

    def consume(dz, r0, r1, v0, v1):
        if gb is not None:
            gb[v0:v1] += dz.sum(0)
        if compute_dtype != torch.float32:
            dz = dz.to(compute_dtype)
        if gh is not None:
            addmm_f32(gh[r0:r1], dz, w[v0:v1])
        if gw is not None:
            addmm_f32(gw[v0:v1], dz.t(), h[r0:r1])

    _backward(rows.count, n_vocab, tile, consume, tgt, lse, entropy, g_lp, g_h, inv_t, guard, tc, vc)
    return gh, gw, gb


class _ChunkedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, extras, tc, vc):
        ctx.set_materialize_grads(False)
        n, n_vocab = logits.shape
        rows = _Rows.of(targets, ignore_index)
        tgt = rows.take(targets).long()
        inv_t = 1.0 / temperature
        guard = _may_hold_neg_inf(logits)
        tc, vc = chunk_sizes(logits.device, tc, vc)
        tile = _logits_rows(logits, rows)
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            out = _forward(rows.count, n_vocab, tile, tgt, inv_t, extras, guard, tc, vc, logits.device)
            stats = _scatter_stats(out, rows, n, extras, n_vocab)
        ctx.save_for_backward(logits, _saved_rows(ctx, rows), tgt, out["lse"], out["entropy"])
        ctx.cfg = (inv_t, guard, tc, vc)
        extra_out = [stats[k] for k in ("mean_logits", "is_top1", "log_sum_sq_probs") if k in stats]
        ctx.mark_non_differentiable(*extra_out)
        return (stats["logprobs"], stats["entropy"], *extra_out)

    @staticmethod
    def backward(ctx, g_lp, g_h, *_unused):
        logits, saved_rows, tgt, lse, entropy = ctx.saved_tensors
        inv_t, guard, tc, vc = ctx.cfg
        rows = _restored_rows(ctx, saved_rows, logits.shape[0])
        if g_lp is None and g_h is None:
            return (None,) * 7
        if rows.count == 0:
            return (torch.zeros_like(logits),) + (None,) * 6
        g_lp, g_h = _grads_of_rows(rows, g_lp, g_h)
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)

        def consume(dz, r0, r1, v0, v1):
            grad[rows.span(r0, r1), v0:v1] = dz.to(grad.dtype)

        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            _backward(rows.count, logits.shape[1], _logits_rows(logits, rows), consume, tgt, lse, entropy, g_lp,
                      g_h, inv_t, guard, tc, vc)
        return (grad,) + (None,) * 6


def _logits_rows(logits: torch.Tensor, rows: _Rows):
    """A tile function over the worked-on rows of materialized logits; each tile is a fresh fp32 copy."""
    if rows.index is not None:
        return lambda r0, r1, v0, v1: logits[rows.index[r0:r1], v0:v1].float()  # advanced indexing copies

    def tile(r0, r1, v0, v1):
        z = logits[r0:r1, v0:v1].to(torch.float32, copy=True)
        return torch.where(rows.valid[r0:r1, None], z, torch.zeros((), dtype=z.dtype, device=z.device))

    return tile


def _pack(outputs, extras) -> TokenStats:
    lp, ent, *rest = outputs
    named = dict(zip([k for k in ("mean_logits", "is_top1", "log_sum_sq_probs") if k in extras], rest))
    return TokenStats(lp, ent, **named)


def chunked_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    extras: tuple[str, ...] = (),
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> TokenStats:
    """Chunked backend on materialized logits ``[N, V]``; outputs ``[N]``."""
    extras = tuple(k for k in ("mean_logits", "is_top1", "log_sum_sq_probs") if k in extras)
    out = _ChunkedLogits.apply(logits, targets, temperature, ignore_index, extras, token_chunk, vocab_chunk)
    return _pack(out, extras)


def chunked_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    extras: tuple[str, ...] = (),
    compute_dtype: torch.dtype | None = None,
    token_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> TokenStats:
    """Chunked fused LM head; ``hidden [N, d]``, ``weight [V, d]``; outputs ``[N]``."""
    extras = tuple(k for k in ("mean_logits", "is_top1", "log_sum_sq_probs") if k in extras)
    out = _ChunkedLinear.apply(
        hidden, weight, bias, targets, temperature, ignore_index, extras, compute_dtype or hidden.dtype,
        token_chunk, vocab_chunk,
    )
    return _pack(out, extras)
