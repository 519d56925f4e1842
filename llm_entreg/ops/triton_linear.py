"""Triton fused LM head: log-prob + entropy of ``softmax((hidden @ weight.T + bias) / T)``, no ``[N, V]`` logits.

Forward: grid ``(token blocks, vocabulary splits)``. A program owns ``BLOCK_N`` tokens and one contiguous slice of
the vocabulary; it loops over ``BLOCK_V`` vocabulary blocks, forms each logits tile with ``tl.dot`` over ``d`` in
``BLOCK_D`` steps (operands cast to the compute dtype, fp32 accumulation), and folds the tile into the shifted online
statistics of DESIGN.md (max ``m``, ``S``, ``T'``), picks the target logit and the optional extras. Each split writes
its partial statistics (``[splits, N]`` fp32); a few elementwise torch ops merge them into ``lse`` and ``H``.
Splitting the vocabulary keeps the GPU busy when there are few token blocks.

Backward: token chunks x vocabulary chunks (the ``dz`` buffer is bounded by :data:`BWD_BUFFER_BYTES`). A Triton kernel
recomputes each logits tile and writes ``dz = (1/T) [g_lp (1[i=y] - p) - g_H p (z - lse + H)]`` in the compute dtype;
torch GEMMs then give ``grad_hidden = dz @ W``, ``grad_weight = dz^T @ h`` (fp32 accumulation across chunks) and
``grad_bias = sum dz`` (fp32). Only gradients that are needed are computed.

Ignored positions (``target == ignore_index``) are compacted away before any kernel runs, so they cost nothing.
Saved for backward: ``hidden``, ``weight``, ``bias`` (the inputs themselves), and per valid token ``(lse, H)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TokenStats, gathered_params
from .triton_logits import round_to_bf16

#: Tile sizes of the forward and of the backward ``dz`` kernel (``tl.dot`` needs every side >= 16).
BLOCK_N = 64
BLOCK_V = 128
BLOCK_D = 64
#: Upper bound on the backward's ``dz`` buffer (token chunk x vocabulary chunk, in the compute dtype).
BWD_BUFFER_BYTES = 256 * 2**20
#: Smallest token chunk before the backward also chunks the vocabulary.
MIN_TOKEN_CHUNK = 256

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _interp_round(x, COMPUTE: tl.constexpr):
    """fp32 ``x`` rounded (to nearest even) to ``COMPUTE`` and kept in fp32; the interpreter's bf16 cast truncates."""
    if COMPUTE == tl.bfloat16:
        return round_to_bf16(x)
    else:
        return x.to(COMPUTE).to(tl.float32)


@triton.jit
def _logits_tile(
    h_ptr,
    stride_hn,
    stride_hd,
    w_ptr,
    stride_wv,
    stride_wd,
    b_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    temperature,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``z = (h[rows] @ w[cols].T + b[cols]) / T``, an fp32 ``[BLOCK_N, BLOCK_V]`` tile; columns past the end: -inf."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    ks0 = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_rows = w_ptr + cols[:, None] * stride_wv
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + ks0
        k_ok = ks < D
        h = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wd, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if INTERPRETER:
            # Interpreter only (its dot multiplies bf16 bit patterns): round to the compute dtype, multiply in fp32.
            # Products of two bf16/fp16 values are exact in fp32: this matches a tensor-core dot, fp32 accumulation.
            acc = tl.dot(_interp_round(h.to(tl.float32), COMPUTE), tl.trans(_interp_round(w.to(tl.float32), COMPUTE)),
                         acc, input_precision="ieee")
        else:
            acc = tl.dot(h.to(COMPUTE), tl.trans(w.to(COMPUTE)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if INTERPRETER:
            b = _interp_round(b, COMPUTE)
        else:
            b = b.to(COMPUTE).to(tl.float32)
        acc += b[None, :]
    z = acc / temperature
    return tl.where(col_ok[None, :], z, -float("inf"))


@triton.jit
def _linear_fwd_kernel(
    h_ptr,
    stride_hn,
    stride_hd,
    w_ptr,
    stride_wv,
    stride_wd,
    b_ptr,
    targets_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    q_ptr,
    zsum_ptr,
    best_ptr,
    best_idx_ptr,
    N,
    V,
    D,
    V_PER_SPLIT,
    temperature,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_LSSP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    v_lo = split.to(tl.int64) * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # shifted statistic T' = sum exp(z - m) (z - m)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_N], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.full([BLOCK_N], -float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + cols0
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, rows, row_ok, cols, col_ok,
                         D, temperature, HAS_BIAS, COMPUTE, PRECISION, INTERPRETER, BLOCK_N, BLOCK_V, BLOCK_D)
        blk_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, blk_max)
        # Rows whose columns so far are all -inf keep m = -inf: shift them by 0 so that nothing becomes NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        c = tl.exp(m - shift)  # 0 where nothing was accumulated yet
        delta = tl.where(m == -float("inf"), 0.0, m - shift)
        is_ninf = z == -float("inf")
        e = tl.exp(z - shift[:, None])
        zs = tl.where(is_ninf, 0.0, z - shift[:, None])  # e = 0 there: contributes 0, not 0 * -inf
        t = c * (t + delta * s) + tl.sum(e * zs, axis=1)
        s = c * s + tl.sum(e, axis=1)
        if WANT_LSSP:
            q = c * c * q + tl.sum(e * e, axis=1)
        if WANT_MEAN:
            zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        if WANT_TOP1:
            first = tl.min(tl.where((z == blk_max[:, None]) & col_ok[None, :], cols[None, :], V), axis=1)
            better = blk_max > best  # strict: the first maximum over the vocabulary wins ties
            best_idx = tl.where(better, first, best_idx)
            best = tl.where(better, blk_max, best)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)
    if WANT_LSSP:
        tl.store(q_ptr + out, q, mask=row_ok)
    if WANT_MEAN:
        tl.store(zsum_ptr + out, zsum, mask=row_ok)
    if WANT_TOP1:
        tl.store(best_ptr + out, best, mask=row_ok)
        tl.store(best_idx_ptr + out, best_idx, mask=row_ok)


@triton.jit
def _linear_dz_kernel(
    h_ptr,
    stride_hn,
    stride_hd,
    w_ptr,
    stride_wv,
    stride_wd,
    b_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_lp_ptr,
    g_h_ptr,
    dz_ptr,
    stride_dzn,
    N,
    V,
    D,
    v_offset,
    temperature,
    HAS_BIAS: tl.constexpr,
    HAS_G_LP: tl.constexpr,
    HAS_G_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, rows, row_ok, cols, col_ok,
                     D, temperature, HAS_BIAS, COMPUTE, PRECISION, INTERPRETER, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_G_LP:
        y = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - v_offset
        g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
        dz = g_lp[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    if HAS_G_H:
        g_h = tl.load(g_h_ptr + rows, mask=row_ok, other=0.0)
        h = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        # p (log p + H); a -inf logit has p = 0 and contributes exactly 0 (not 0 * -inf).
        log_p = tl.where(z == -float("inf"), 0.0, z - lse[:, None])
        dz = dz - g_h[:, None] * (p * (log_p + h[:, None]))
    dz = dz / temperature
    if INTERPRETER:
        dz = _interp_round(dz, COMPUTE)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _precision(compute_dtype: torch.dtype):
    if compute_dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _num_splits(n_rows: int, n_vocab: int, device: torch.device) -> tuple[int, int]:
    token_blocks = triton.cdiv(n_rows, BLOCK_N)
    vocab_blocks = triton.cdiv(n_vocab, BLOCK_V)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few splits, so that the merge is exercised
    splits = max(1, min(vocab_blocks, triton.cdiv(target, token_blocks)))
    per_split = triton.cdiv(vocab_blocks, splits)
    return triton.cdiv(vocab_blocks, per_split), per_split * BLOCK_V


def _forward_stats(h, weight, bias, targets, temperature, compute_dtype, want_mean, want_top1, want_lssp):
    """Run the forward kernel on ``h [n, d]`` (all targets valid) and merge the splits. Returns fp32 ``[n]`` tensors."""
    n, d = h.shape
    v = weight.shape[0]
    dev = h.device
    splits, v_per_split = _num_splits(n, v, dev)
    f32 = dict(device=dev, dtype=torch.float32)
    m = torch.empty(splits, n, **f32)
    s = torch.empty(splits, n, **f32)
    t = torch.empty(splits, n, **f32)
    zy = torch.empty(splits, n, **f32)
    q = torch.empty(splits, n, **f32) if want_lssp else m
    zsum = torch.empty(splits, n, **f32) if want_mean else m
    best = torch.empty(splits, n, **f32) if want_top1 else m
    best_idx = torch.empty(splits, n, device=dev, dtype=torch.int64) if want_top1 else m
    grid = (triton.cdiv(n, BLOCK_N), splits)
    _linear_fwd_kernel[grid](
        h, h.stride(0), h.stride(1),
        weight, weight.stride(0), weight.stride(1),
        h if bias is None else bias,
        targets,
        m, s, t, zy, q, zsum, best, best_idx,
        n, v, d, v_per_split, temperature,
        HAS_BIAS=bias is not None,
        COMPUTE=_TL_DTYPE[compute_dtype],
        PRECISION=_precision(compute_dtype),
        INTERPRETER=not h.is_cuda,
        WANT_MEAN=want_mean,
        WANT_TOP1=want_top1,
        WANT_LSSP=want_lssp,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
        num_warps=8,
    )  # fmt: skip
    # Merge the splits: the same shifted update as in the kernel, over the split axis.
    m_all = m.max(0).values
    shift = torch.where(torch.isfinite(m_all), m_all, torch.zeros_like(m_all))
    c = torch.exp(m - shift)
    delta = torch.where(torch.isfinite(m), m - shift, torch.zeros_like(m))
    s_all = (c * s).sum(0)
    log_s = torch.log(s_all)
    lse = m_all + log_s
    out = {
        "lse": lse,
        "logprobs": zy.sum(0) - lse,
        "entropy": log_s - (c * (t + delta * s)).sum(0) / s_all,
    }
    if want_mean:
        out["mean_logits"] = zsum.sum(0) / v
    if want_top1:
        is_max = best == best.max(0).values
        first = torch.where(is_max, best_idx, torch.full_like(best_idx, v)).min(0).values
        out["is_top1"] = first == targets
    if want_lssp:
        out["log_sum_sq_probs"] = torch.log((c * c * q).sum(0)) - 2 * log_s
    return out


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp32 accumulation inside the GEMM where the platform offers it)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _OUT_DTYPE_MM[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM[0] = False
    return torch.mm(a, b).float()


_OUT_DTYPE_MM = [True]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_elems: int) -> None:
    """``acc += a @ b`` into an fp32 accumulator, in row slices so that no temporary exceeds ``max_elems``."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    rows = max(1, max_elems // max(1, acc.shape[1]))
    for r0 in range(0, acc.shape[0], rows):
        acc[r0 : r0 + rows].add_(_mm_fp32(a[r0 : r0 + rows], b))


def _chunks(n: int, v: int, elem_size: int) -> tuple[int, int]:
    budget = max(1, BWD_BUFFER_BYTES // elem_size)
    if n * v <= budget:
        return max(n, 1), v
    n_chunk = budget // v
    if n_chunk >= MIN_TOKEN_CHUNK or n_chunk >= n:
        return max(1, min(n, n_chunk)), v
    n_chunk = min(n, MIN_TOKEN_CHUNK)
    v_chunk = max(BLOCK_V, budget // n_chunk // BLOCK_V * BLOCK_V)
    return n_chunk, min(v, v_chunk)


class _TritonLinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, compute_dtype, want):
        want_mean, want_top1, want_lssp = want
        n = hidden.shape[0]
        dev = hidden.device
        valid = targets != ignore_index
        idx = valid.nonzero().squeeze(1)  # one host sync; ignored positions then cost nothing
        n_valid = idx.numel()
        if n_valid == n:
            idx = None
        f32 = dict(device=dev, dtype=torch.float32)
        with gathered_params(weight, bias), torch.autocast(dev.type, enabled=False):
            h_v = hidden if idx is None else hidden.index_select(0, idx)
            t_v = targets if idx is None else targets.index_select(0, idx)
            if n_valid > 0:
                stats = _forward_stats(h_v, weight, bias, t_v, temperature, compute_dtype, *want)
            else:
                stats = {k: torch.zeros(0, **f32) for k in ("lse", "logprobs", "entropy", "mean_logits",
                                                               "log_sum_sq_probs")}
                stats["is_top1"] = torch.zeros(0, device=dev, dtype=torch.bool)

        def scatter(x: torch.Tensor) -> torch.Tensor:
            if idx is None:
                return x
            full = torch.zeros(n, device=dev, dtype=x.dtype)
            return full.index_copy_(0, idx, x)

        outs = [scatter(stats["logprobs"]), scatter(stats["entropy"])]
        extras = [scatter(stats[k]) for k, w in zip(("mean_logits", "is_top1", "log_sum_sq_probs"), want) if w]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, idx, t_v, stats["lse"], stats["entropy"])
        ctx.temperature = temperature
        ctx.compute_dtype = compute_dtype
        ctx.mark_non_differentiable(*extras)
        return (*outs, *extras)

    @staticmethod
    def backward(ctx, g_lp, g_h, *_unused):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 8
        if (g_lp is None and g_h is None) or not (need_h or need_w or need_b):
            return nones
        hidden, weight, bias, idx, t_v, lse_v, ent_v = ctx.saved_tensors
        cdt = ctx.compute_dtype
        n, d = hidden.shape
        dev = hidden.device
        grad_hidden = grad_weight = grad_bias = None
        with gathered_params(weight, bias), torch.autocast(dev.type, enabled=False):
            v = weight.shape[0]
            n_valid = lse_v.shape[0]

            def pick(g):
                if g is None:
                    return None
                g = g.float()
                return (g if idx is None else g.index_select(0, idx)).contiguous()

            if n_valid == 0:  # every position ignored: all gradients are zero
                return (
                    torch.zeros_like(hidden) if need_h else None,
                    torch.zeros_like(weight) if need_w else None,
                    torch.zeros_like(bias) if need_b else None,
                    *nones[3:],
                )
            g_lp_v, g_h_v = pick(g_lp), pick(g_h)
            h_v = hidden if idx is None else hidden.index_select(0, idx)
            n_chunk, v_chunk = _chunks(n_valid, v, torch.finfo(cdt).bits // 8)
            one_token_chunk = n_chunk >= n_valid
            one_vocab_chunk = v_chunk >= v
            buf = torch.empty(n_chunk * v_chunk, device=dev, dtype=cdt)
            w_c = weight.to(cdt) if need_h else None
            if need_h:
                gh_v = torch.empty(n_valid, d, device=dev, dtype=cdt if one_vocab_chunk else torch.float32)
                if not one_vocab_chunk:
                    gh_v.zero_()
            if need_w:
                gw = torch.empty(v, d, device=dev, dtype=cdt if one_token_chunk else torch.float32)
                if not one_token_chunk:
                    gw.zero_()
            if need_b:
                gb = torch.zeros(v, device=dev, dtype=torch.float32)
            dummy = lse_v
            for r0 in range(0, n_valid, n_chunk):
                r1 = min(r0 + n_chunk, n_valid)
                h_chunk = h_v[r0:r1]
                hc_chunk = h_chunk.to(cdt) if need_w else None
                for c0 in range(0, v, v_chunk):
                    c1 = min(c0 + v_chunk, v)
                    dz = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                    grid = (triton.cdiv(r1 - r0, BLOCK_N), triton.cdiv(c1 - c0, BLOCK_V))
                    w_slice = weight[c0:c1]
                    _linear_dz_kernel[grid](
                        h_chunk, h_chunk.stride(0), h_chunk.stride(1),
                        w_slice, w_slice.stride(0), w_slice.stride(1),
                        dummy if bias is None else bias[c0:c1],
                        t_v[r0:r1], lse_v[r0:r1], ent_v[r0:r1],
                        dummy if g_lp_v is None else g_lp_v[r0:r1],
                        dummy if g_h_v is None else g_h_v[r0:r1],
                        dz, dz.stride(0),
                        r1 - r0, c1 - c0, d, c0, ctx.temperature,
                        HAS_BIAS=bias is not None,
                        HAS_G_LP=g_lp_v is not None,
                        HAS_G_H=g_h_v is not None,
                        COMPUTE=_TL_DTYPE[cdt],
                        PRECISION=_precision(cdt),
                        INTERPRETER=not h_chunk.is_cuda,
                        BLOCK_N=BLOCK_N,
                        BLOCK_V=BLOCK_V,
                        BLOCK_D=BLOCK_D,
                        num_warps=8,
                    )  # fmt: skip
                    if need_h:
                        if one_vocab_chunk:
                            torch.mm(dz, w_c, out=gh_v[r0:r1])
                        else:
                            _accumulate(gh_v[r0:r1], dz, w_c[c0:c1], buf.numel())
                    if need_w:
                        if one_token_chunk:
                            torch.mm(dz.t(), hc_chunk, out=gw[c0:c1])
                        else:
                            _accumulate(gw[c0:c1], dz.t(), hc_chunk, buf.numel())
                    if need_b:
                        gb[c0:c1] += dz.sum(0, dtype=torch.float32)
            if need_h:
                if idx is None:
                    grad_hidden = gh_v.to(hidden.dtype)
                else:
                    grad_hidden = torch.zeros(n, d, device=dev, dtype=hidden.dtype)
                    grad_hidden.index_copy_(0, idx, gh_v.to(hidden.dtype))
            if need_w:
                grad_weight = gw.to(weight.dtype)
            if need_b:
                grad_bias = gb.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def triton_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    extras: tuple[str, ...],
    compute_dtype: torch.dtype,
) -> TokenStats:
    """Fused LM head on Triton: per-token log-prob, entropy and extras of ``softmax((h W^T + b) / T)``, flat ``[N]``.

    Matmuls run in ``compute_dtype`` with fp32 accumulation, statistics in fp32; gradients come back in each input's
    own dtype. Positions with ``targets == ignore_index`` give 0 (``False``) and get zero gradient.
    """
    if compute_dtype not in _TL_DTYPE:
        raise ValueError(f"compute_dtype: expected one of {list(_TL_DTYPE)}, got {compute_dtype}")
    want = tuple(name in extras for name in ("mean_logits", "is_top1", "log_sum_sq_probs"))
    outs = _TritonLinearTokenStats.apply(
        hidden, weight, bias, targets.reshape(-1).contiguous(), float(temperature), int(ignore_index), compute_dtype,
        want,
    )
    logprobs, entropy, rest = outs[0], outs[1], list(outs[2:])
    fields = [rest.pop(0) if w else None for w in want]
    return TokenStats(logprobs, entropy, *fields)
