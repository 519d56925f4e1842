"""Triton log-prob + entropy over materialized logits ``[N, V]`` (forward and backward kernels), one program per
token row with the online single pass; also the row kernels the gemm-mode head and the loss-fused path use. On a
machine without a GPU they run under ``TRITON_INTERPRET=1``, which must be set before triton is first imported.
The kernels' math: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TokenStats

#: Largest vocabulary block one program folds at a time (a power of two). Tests lower it to exercise many blocks.
MAX_BLOCK_V = 4096


@triton.jit
def round_to_bf16(x):
    """Round fp32 ``x`` to the nearest-even bf16 value, returned as fp32.

    Only used under the Triton interpreter, whose fp32 -> bf16 cast truncates (the compiled cast rounds to nearest
    even); rounding first makes the interpreter's numbers match the GPU's.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _logits_fwd_kernel(
    logits_ptr,
    stride_n,
    stride_v,
    targets_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    mean_ptr,
    top1_ptr,
    lssp_ptr,
    V,
    temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_LSSP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    if y == ignore_index:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WANT_MEAN:
            tl.store(mean_ptr + row, 0.0)
        if WANT_TOP1:
            tl.store(top1_ptr + row, False)
        if WANT_LSSP:
            tl.store(lssp_ptr + row, 0.0)
    else:
        row_ptr = logits_ptr + row * stride_n
        z_y = tl.load(row_ptr + y * stride_v).to(tl.float32) / temperature
        cols0 = tl.arange(0, BLOCK_V)
        m = -float("inf")
        s = 0.0
        t = 0.0  # shifted statistic T' = sum exp(z - m) (z - m)
        q = 0.0  # sum exp(2 (z - m)), for log sum p^2
        z_sum = 0.0
        n_beats = 0  # columns that rule out "target is the first argmax"
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            in_v = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_v, other=-float("inf"))
            z = x.to(tl.float32) / temperature
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every column seen is -inf, m_new is -inf: shift by 0 so that nothing turns into NaN.
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            c = tl.exp(m - shift)  # 0 when nothing was accumulated yet (m = -inf)
            delta = tl.where(m == -float("inf"), 0.0, m - shift)
            e = tl.exp(z - shift)
            zs = tl.where(z == -float("inf"), 0.0, z - shift)  # e = 0 there: contribute 0, not 0 * -inf
            ez = e * zs
            t = c * (t + delta * s) + tl.sum(ez, axis=0)
            s = c * s + tl.sum(e, axis=0)
            if WANT_LSSP:
                q = c * c * q + tl.sum(e * e, axis=0)
            if WANT_MEAN:
                z_sum += tl.sum(tl.where(in_v, z, 0.0), axis=0)
            if WANT_TOP1:
                beats = (z > z_y) | ((z == z_y) & (cols < y))
                n_beats += tl.sum((beats & in_v).to(tl.int32), axis=0)
            m = m_new
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(logprobs_ptr + row, z_y - lse)
        tl.store(entropy_ptr + row, log_s - t / s)
        tl.store(lse_ptr + row, lse)
        if WANT_MEAN:
            tl.store(mean_ptr + row, z_sum / V)
        if WANT_TOP1:
            tl.store(top1_ptr + row, n_beats == 0)
        if WANT_LSSP:
            tl.store(lssp_ptr + row, tl.log(q) - 2.0 * log_s)


@triton.jit
def _logits_bwd_kernel(
    logits_ptr,
    stride_n,
    stride_v,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_lp_ptr,
    g_h_ptr,
    dlogits_ptr,
    stride_dn,
    V,
    temperature,
    ignore_index,
    col_offset,
    BLOCK_V: tl.constexpr,
    HAS_G_LP: tl.constexpr,
    HAS_G_H: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    NARROW_IN_PLACE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row).to(tl.int64)
    out_row = dlogits_ptr + row * stride_dn
    cols0 = tl.arange(0, BLOCK_V)
    if y == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            zero = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(out_row + cols, zero.to(dlogits_ptr.dtype.element_ty), mask=cols < V)
    else:
        row_ptr = logits_ptr + row * stride_n
        lse = tl.load(lse_ptr + row)
        inv_t = 1.0 / temperature
        g_lp = 0.0
        g_h = 0.0
        h = 0.0
        if HAS_G_LP:
            g_lp = tl.load(g_lp_ptr + row).to(tl.float32)
        if HAS_G_H:
            g_h = tl.load(g_h_ptr + row).to(tl.float32)
            h = tl.load(entropy_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            in_v = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_v, other=-float("inf"))
            z = x.to(tl.float32) / temperature
            p = tl.exp(z - lse)
            dz = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_G_LP:
                dz = g_lp * (tl.where(cols + col_offset == y, 1.0, 0.0) - p)
            if HAS_G_H:
                # p (log p + H); a -inf logit has p = 0 and contributes exactly 0 (not 0 * -inf).
                ent = p * (tl.where(z == -float("inf"), lse, z) - lse + h)
                dz = dz - g_h * ent
            dz = dz * inv_t
            if ROUND_BF16:
                dz = round_to_bf16(dz)
            if NARROW_IN_PLACE:
                # dz (2 bytes) over the fp32 logits of this row: the store of column c lands on the fp32 element
                # c // 2, which another warp may not have loaded yet. Every warp of the program has loaded this block
                # (and all earlier ones) once all reach the barrier; the block's stores touch only those columns.
                tl.debug_barrier()
            tl.store(out_row + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=in_v)


def _block_v(n_vocab: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(n_vocab)))


def _num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)


def row_stats(logits, targets, temperature, ignore_index, want_mean=False, want_top1=False, want_lssp=False,
              out=None):
    """One read pass over ``logits [n, V]``: fp32 ``(logprobs, entropy, lse, mean, top1, lssp)`` per row.

    The extras are None unless asked for; rows whose target is ``ignore_index`` give 0 (``False``). ``out``: the
    six tensors to write into (contiguous ``[n]``; None where not wanted) instead of new ones.
    """
    n, v = logits.shape
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    if out is not None:
        logprobs, entropy, lse, mean, top1, lssp = out
    else:
        logprobs = torch.empty(n, **f32)
        entropy = torch.empty(n, **f32)
        lse = torch.empty(n, **f32)
        mean = torch.empty(n, **f32) if want_mean else None
        top1 = torch.empty(n, device=dev, dtype=torch.bool) if want_top1 else None
        lssp = torch.empty(n, **f32) if want_lssp else None
    if n > 0:
        block_v = _block_v(v)
        _logits_fwd_kernel[(n,)](
            logits,
            logits.stride(0),
            logits.stride(1),
            targets,
            logprobs,
            entropy,
            lse,
            mean if want_mean else logprobs,  # placeholders are never touched when the flag is off
            top1 if want_top1 else logprobs,
            lssp if want_lssp else logprobs,
            v,
            temperature,
            ignore_index,
            BLOCK_V=block_v,
            WANT_MEAN=want_mean,
            WANT_TOP1=want_top1,
            WANT_LSSP=want_lssp,
            num_warps=_num_warps(block_v),
        )
    return logprobs, entropy, lse, mean, top1, lssp


def _shares_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors view the same storage (only then can a narrower ``out`` overwrite unread logits)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def row_grad(logits, targets, lse, entropy, g_lp, g_h, temperature, ignore_index, out, col_offset=0):
    """Write ``d(sum g_lp lp + g_H H) / d logits`` of every row into ``out [n, V]`` (any float dtype; may be
    ``logits`` itself: each element is read before it is written, by the same program). ``g_lp``/``g_h``: fp32
    ``[n]`` or None (that term is compiled out). Rows whose target is ``ignore_index`` get 0. ``col_offset``: the
    vocabulary index of ``logits``' first column (a vocabulary chunk's), against which the targets are matched.

    ``out`` may also be a narrower view over ``logits``' own bytes (bf16 ``dz`` over fp32 logits, row ``r`` in the
    first half of fp32 row ``r``): the kernel then puts a barrier between each block's loads and its stores, since
    the store of column ``c`` overwrites the fp32 element ``c // 2``, which another warp of the program loads."""
    n, v = logits.shape
    if n == 0:
        return out
    block_v = _block_v(v)
    _logits_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        targets,
        lse,
        entropy,
        lse if g_lp is None else g_lp,
        lse if g_h is None else g_h,
        out,
        out.stride(0),
        v,
        temperature,
        ignore_index,
        col_offset,
        BLOCK_V=block_v,
        HAS_G_LP=g_lp is not None,
        HAS_G_H=g_h is not None,
        ROUND_BF16=out.dtype == torch.bfloat16 and not out.is_cuda,
        NARROW_IN_PLACE=_shares_bytes(out, logits) and out.element_size() < logits.element_size(),
        num_warps=_num_warps(block_v),
    )
    return out


class _TritonTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_mean, want_top1, want_lssp):
        logprobs, entropy, lse, mean, top1, lssp = row_stats(
            logits, targets, temperature, ignore_index, want_mean, want_top1, want_lssp
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        extras = [t for t in (mean, top1, lssp) if t is not None]
        ctx.mark_non_differentiable(*extras)
        return (logprobs, entropy, *extras)

    @staticmethod
    def backward(ctx, g_lp, g_h, *_unused):
        if (g_lp is None and g_h is None) or not ctx.needs_input_grad[0]:
            return (None,) * 7
        logits, targets, lse, entropy = ctx.saved_tensors
        dlogits = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        g_lp_c = None if g_lp is None else g_lp.contiguous()
        g_h_c = None if g_h is None else g_h.contiguous()
        row_grad(logits, targets, lse, entropy, g_lp_c, g_h_c, ctx.temperature, ctx.ignore_index, dlogits)
        return dlogits, None, None, None, None, None, None


def triton_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    extras: tuple[str, ...] = (),
) -> TokenStats:
    """Per-token log-prob, entropy and the requested extras of ``softmax(logits / temperature)`` (flat ``[N]``).

    ``logits [N, V]`` (any float dtype, any strides), ``targets [N]`` integer. Outputs are float32 (``is_top1``
    bool); positions with ``targets == ignore_index`` give 0 and get zero gradient.
    """
    want = [name in extras for name in ("mean_logits", "is_top1", "log_sum_sq_probs")]
    outs = _TritonTokenStats.apply(logits, targets.contiguous(), float(temperature), int(ignore_index), *want)
    logprobs, entropy, rest = outs[0], outs[1], list(outs[2:])
    fields = [rest.pop(0) if w else None for w in want]
    return TokenStats(logprobs, entropy, *fields)
