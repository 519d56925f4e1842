"""Triton fused LM head: log-prob + entropy of ``softmax((hidden @ weight.T + bias) / T)`` without the ``[N, V]``
logits.

Two modes (:data:`HEAD_MODES`): ``"tiles"`` forms each logits tile with ``tl.dot`` and folds it in registers;
``"gemm"`` (the CUDA default) lets cuBLAS write fp32 logits into a bounded buffer that the row kernels of
:mod:`.triton_logits` fold. Launch configurations are :class:`KernelConfig` per kernel, tunable through
:func:`tuning` or ``LLM_ENTREG_TRITON_FWD`` / ``LLM_ENTREG_TRITON_DZ``. Grid, backward plan and measurements:
docs/kernels.md and docs/kernels_notes.md.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import TokenStats, gathered_params
from ._tiles import addmm_f32, logits_tile as logits_f32, mm_out_dtype_available
from .triton_logits import round_to_bf16

#: Tile sizes under the Triton interpreter (CPU tensors) and the fallback elsewhere; tests lower them so that every
#: loop runs several times. ``tl.dot`` needs every side >= 16. CUDA defaults: :func:`kernel_config`.
BLOCK_N = 64
BLOCK_V = 128
BLOCK_D = 64
#: Upper bound on the backward's ``dz`` buffer (token chunk x vocabulary chunk, in the compute dtype).
DZ_BUFFER_BYTES = 192 * 2**20
#: Upper bound on an fp32 gradient accumulator: ``grad_hidden`` of one token chunk (``[token_chunk, d]``), or
#: ``grad_weight`` (``[V, d]``) when the tokens need several chunks and it fits beside the first. Peak extra memory of
#: the backward is about ``DZ_BUFFER_BYTES + ACC_BYTES`` (448 MiB) beyond the inputs and their gradients.
ACC_BYTES = 256 * 2**20
#: Fewest vocabulary splits of the forward on CUDA, and token blocks per group of the dz kernel's launch order.
MIN_SPLITS = 16
DZ_GROUP = 8
#: Forward launch order: split index fastest (True) or token block fastest (False, version 1's order).
SPLIT_FASTEST = True
#: How the head forms its logits tiles (:func:`head_mode`): ``"tiles"``, the Triton kernels above (each logits tile
#: made by ``tl.dot`` and folded in registers, nothing written), or ``"gemm"``, cuBLAS GEMMs with an fp32 result into a
#: bounded buffer that one read pass of the Triton row kernels (``triton_logits``) folds. Measured on an H200
#: (docs/kernels_notes.md): at 128 x 128 tiles the Triton mainloop is bound by L2 bandwidth (~64 FLOP per byte of
#: tile loads), while cuBLAS's clustered 128 x 256 tiles reach the matmul rate, so "gemm" is the CUDA default.
HEAD_MODES = ("tiles", "gemm")
#: fp32 logits buffer of the "gemm" mode: the forward's token chunk (full vocabulary rows) and the backward's
#: token x vocabulary chunk, whose ``dz`` is written in place over the same bytes. Backward peak extra memory:
#: about ``GEMM_BUFFER_BYTES + ACC_BYTES`` (480 MiB).
GEMM_BUFFER_BYTES = 224 * 2**20
#: Smallest token chunk, and the vocabulary chunk's multiple.
MIN_TOKEN_CHUNK = 256
VOCAB_ALIGN = 256


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of one kernel: tile ``block_n x block_v`` (tokens x vocabulary), ``block_d`` per dot."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "KernelConfig":
        """``"128x128x64"`` or ``"128x128x64w8s3"`` (warps 8, stages 3)."""
        import re

        m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?\s*", str(text))
        if not m:
            raise ValueError(f"kernel config: expected BNxBVxBD[wW][sS] such as 128x128x64w8s3, got {text!r}")
        bn, bv, bd = (int(x) for x in m.groups()[:3])
        warps = int(m.group(4)) if m.group(4) else 8
        stages = int(m.group(5)) if m.group(5) else 3
        for name, x in (("BLOCK_N", bn), ("BLOCK_V", bv), ("BLOCK_D", bd), ("warps", warps)):
            if x < 1 or x & (x - 1):
                raise ValueError(f"kernel config {text!r}: {name} must be a power of two, got {x}")
        if min(bn, bv, bd) < 16:
            raise ValueError(f"kernel config {text!r}: every block side must be >= 16 (tl.dot)")
        if stages < 1:
            raise ValueError(f"kernel config {text!r}: stages must be >= 1")
        return cls(bn, bv, bd, warps, stages)

    def __str__(self) -> str:
        return f"{self.block_n}x{self.block_v}x{self.block_d}w{self.num_warps}s{self.num_stages}"


KERNELS = ("fwd", "dz")
_OVERRIDES: dict[str, KernelConfig] = {}
_MODE_OVERRIDE: list[str | None] = [None]


def set_head_mode(mode: str | None) -> None:
    """Force the head's mode (``"tiles"`` or ``"gemm"``, see :data:`HEAD_MODES`); ``None`` restores the default."""
    if mode is not None and mode not in HEAD_MODES:
        raise ValueError(f"head mode: expected one of {HEAD_MODES}, got {mode!r}")
    _MODE_OVERRIDE[0] = mode


def head_mode(device: torch.device) -> str:
    """The mode the head runs in: override, else ``LLM_ENTREG_TRITON_HEAD``, else "gemm" on CUDA, "tiles" elsewhere
    (under the interpreter the tiles kernels are what needs testing; both modes are tested there) and on a torch
    without ``mm(..., out_dtype=float32)`` (before 2.8, or once a call has failed): there the fp32 logits would need
    fp32 copies of the operands."""
    if _MODE_OVERRIDE[0] is not None:
        return _MODE_OVERRIDE[0]
    env = os.environ.get("LLM_ENTREG_TRITON_HEAD")
    if env:
        if env not in HEAD_MODES:
            raise ValueError(f"LLM_ENTREG_TRITON_HEAD: expected one of {HEAD_MODES}, got {env!r}")
        return env
    return "gemm" if device.type == "cuda" and mm_out_dtype_available() else "tiles"


def set_kernel_config(kernel: str, config: "KernelConfig | str | None") -> None:
    """Force the launch configuration of ``kernel`` (``"fwd"`` or ``"dz"``); ``None`` restores the default."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if config is None:
        _OVERRIDES.pop(kernel, None)
    else:
        _OVERRIDES[kernel] = config if isinstance(config, KernelConfig) else KernelConfig.parse(config)


def kernel_config(kernel: str, device: torch.device, compute_dtype: torch.dtype) -> KernelConfig:
    """The configuration ``kernel`` launches with: override, else environment, else the device default.

    The CUDA defaults are the starting points written down in docs/kernels_notes.md, to be confirmed by the sweep of
    ``scripts/gpu/benchmark_suite.sh``: on Hopper/Ampere with a half-precision compute dtype a 128 x 128 tile (8 warps,
    3 stages: 96 KiB of shared memory, 64 fp32 accumulator registers per thread, room for the softmax epilogue).
    """
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    env = os.environ.get(f"LLM_ENTREG_TRITON_{kernel.upper()}")
    if env:
        return KernelConfig.parse(env)
    if device.type != "cuda":
        return KernelConfig(BLOCK_N, BLOCK_V, BLOCK_D, 8, 1)
    major, _ = torch.cuda.get_device_capability(device)
    if compute_dtype != torch.float32:
        return KernelConfig(128, 128, 64, 8, 3) if major >= 8 else KernelConfig(64, 128, 32, 4, 2)
    return KernelConfig(64, 128, 32, 8, 3) if major >= 8 else KernelConfig(64, 64, 32, 4, 2)


#: Module-level tuning knobs that :func:`tuning` sets, by its keyword.
TUNING_KNOBS = {"min_splits": "MIN_SPLITS", "dz_group": "DZ_GROUP", "split_fastest": "SPLIT_FASTEST",
                "gemm_buffer_bytes": "GEMM_BUFFER_BYTES", "acc_bytes": "ACC_BYTES"}


@contextmanager
def tuning(head_mode: str | None = None, fwd: KernelConfig | str | None = None, dz: KernelConfig | str | None = None,
           min_splits: int | None = None, dz_group: int | None = None, split_fastest: bool | None = None,
           gemm_buffer_bytes: int | None = None, acc_bytes: int | None = None):
    """Within the block, run the head with these settings; on exit (error included) restore the previous ones.

    ``head_mode`` as :func:`set_head_mode`, ``fwd`` / ``dz`` as :func:`set_kernel_config`, the rest set
    :data:`MIN_SPLITS`, :data:`DZ_GROUP`, :data:`SPLIT_FASTEST`, :data:`GEMM_BUFFER_BYTES`, :data:`ACC_BYTES`.
    ``None`` leaves a setting as it is. The backward reads the same settings: run it inside the block too.
    """
    saved_mode, saved_configs = _MODE_OVERRIDE[0], dict(_OVERRIDES)
    values = {"min_splits": min_splits, "dz_group": dz_group, "split_fastest": split_fastest,
              "gemm_buffer_bytes": gemm_buffer_bytes, "acc_bytes": acc_bytes}
    saved_knobs = {name: globals()[name] for name in TUNING_KNOBS.values()}
    try:
        if head_mode is not None:
            set_head_mode(head_mode)
        for kernel, config in (("fwd", fwd), ("dz", dz)):
            if config is not None:
                set_kernel_config(kernel, config)
        globals().update({TUNING_KNOBS[k]: v for k, v in values.items() if v is not None})
        yield
    finally:
        _MODE_OVERRIDE[0] = saved_mode
        _OVERRIDES.clear()
        _OVERRIDES.update(saved_configs)
        globals().update(saved_knobs)


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
    EVEN_D: tl.constexpr,
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
        if EVEN_D:  # d is a multiple of BLOCK_D (the usual case): only the row and column edges are masked
            h = tl.load(h_rows + ks[None, :] * stride_hd, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_rows + ks[None, :] * stride_wd, mask=col_ok[:, None], other=0.0)
        else:
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
    SPLITS,
    temperature,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLIT_FASTEST: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_LSSP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # 1-D grid, the split index fastest: the programs resident at one time cover few token blocks and many vocabulary
    # splits, so their hidden rows stay in L2 (token blocks fastest would put every token block's rows in flight).
    pid = tl.program_id(0)
    if SPLIT_FASTEST:
        split = pid % SPLITS
        pid_n = pid // SPLITS
    else:  # token block fastest (version 1's order; kept to measure what the order buys)
        n_tb = tl.cdiv(N, BLOCK_N)
        pid_n = pid % n_tb
        split = pid // n_tb
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
                         D, temperature, HAS_BIAS, COMPUTE, PRECISION, INTERPRETER, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
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
    EVEN_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grouped 1-D grid (as a GEMM's): GROUP token blocks x all vocabulary blocks per group, token block fastest, so
    # the programs resident at one time share a few hidden row blocks and a band of weight rows in L2.
    pid = tl.program_id(0)
    n_tb = tl.cdiv(N, BLOCK_N)
    n_vb = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * n_vb
    first_tb = (pid // per_group) * GROUP
    group_size = tl.minimum(n_tb - first_tb, GROUP)
    tb = first_tb + (pid % per_group) % group_size
    vb = (pid % per_group) // group_size
    rows = tb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vb.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr, rows, row_ok, cols, col_ok,
                     D, temperature, HAS_BIAS, COMPUTE, PRECISION, INTERPRETER, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
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


def _tile_launch_args(cfg: KernelConfig, compute_dtype: torch.dtype, d: int, is_cuda: bool) -> dict:
    """The launch arguments both kernels pass to ``_logits_tile``: dtype, precision, tiles, warps, stages."""
    return dict(
        COMPUTE=_TL_DTYPE[compute_dtype],
        PRECISION=_precision(compute_dtype),
        INTERPRETER=not is_cuda,
        EVEN_D=d % cfg.block_d == 0,
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _num_splits(n_rows: int, n_vocab: int, device: torch.device, cfg: KernelConfig | None = None) -> tuple[int, int]:
    """``(splits, columns per split)`` of the forward: about 2 programs per SM over all token blocks."""
    cfg = cfg or kernel_config("fwd", device, torch.float32)
    token_blocks = triton.cdiv(n_rows, cfg.block_n)
    vocab_blocks = triton.cdiv(n_vocab, cfg.block_v)
    if device.type == "cuda":
        # at least 2 programs per SM, and at least MIN_SPLITS splits so that the resident programs span few token
        # blocks (their hidden rows then stay in L2 while the weight streams)
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        floor = MIN_SPLITS
    else:
        target, floor = 4, 1  # the interpreter: a few splits, so that the merge is exercised
    splits = max(1, min(vocab_blocks, max(floor, triton.cdiv(target, token_blocks))))
    per_split = triton.cdiv(vocab_blocks, splits)
    return triton.cdiv(vocab_blocks, per_split), per_split * cfg.block_v


def _forward_stats(h, weight, bias, targets, temperature, compute_dtype, want_mean, want_top1, want_lssp):
    """Run the forward kernel on ``h [n, d]`` (all targets valid) and merge the splits. Returns fp32 ``[n]`` tensors."""
    n, d = h.shape
    v = weight.shape[0]
    dev = h.device
    cfg = kernel_config("fwd", dev, compute_dtype)
    splits, v_per_split = _num_splits(n, v, dev, cfg)
    f32 = dict(device=dev, dtype=torch.float32)
    m = torch.empty(splits, n, **f32)
    s = torch.empty(splits, n, **f32)
    t = torch.empty(splits, n, **f32)
    zy = torch.empty(splits, n, **f32)
    q = torch.empty(splits, n, **f32) if want_lssp else m
    zsum = torch.empty(splits, n, **f32) if want_mean else m
    best = torch.empty(splits, n, **f32) if want_top1 else m
    best_idx = torch.empty(splits, n, device=dev, dtype=torch.int64) if want_top1 else m
    grid = (triton.cdiv(n, cfg.block_n) * splits,)
    _linear_fwd_kernel[grid](
        h, h.stride(0), h.stride(1),
        weight, weight.stride(0), weight.stride(1),
        h if bias is None else bias,
        targets,
        m, s, t, zy, q, zsum, best, best_idx,
        n, v, d, v_per_split, splits, temperature,
        HAS_BIAS=bias is not None,
        SPLIT_FASTEST=SPLIT_FASTEST,
        WANT_MEAN=want_mean,
        WANT_TOP1=want_top1,
        WANT_LSSP=want_lssp,
        **_tile_launch_args(cfg, compute_dtype, d, h.is_cuda),
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


def _forward_stats_gemm(h, weight, bias, targets, temperature, compute_dtype, want_mean, want_top1, want_lssp):
    """:func:`_forward_stats` in the "gemm" mode: per token chunk one cuBLAS GEMM into the fp32 logits buffer, then
    one read pass of ``triton_logits.row_stats`` over the full rows."""
    from .triton_logits import row_stats

    n, d = h.shape
    v = weight.shape[0]
    dev = h.device
    f32 = dict(device=dev, dtype=torch.float32)
    tc = max(1, min(n, GEMM_BUFFER_BYTES // (4 * v)))
    if 256 <= tc < n:
        tc = tc // 128 * 128  # several chunks: whole GEMM tiles
    buf = torch.empty(tc * v, **f32)
    w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    out = {"lse": torch.empty(n, **f32), "logprobs": torch.empty(n, **f32), "entropy": torch.empty(n, **f32)}
    if want_mean:
        out["mean_logits"] = torch.empty(n, **f32)
    if want_top1:
        out["is_top1"] = torch.empty(n, device=dev, dtype=torch.bool)
    if want_lssp:
        out["log_sum_sq_probs"] = torch.empty(n, **f32)
    never = -(2**62)  # every target here is valid
    for r0 in range(0, n, tc):
        r1 = min(r0 + tc, n)
        z = logits_f32(h[r0:r1].to(compute_dtype), w, b, out=buf[: (r1 - r0) * v].view(r1 - r0, v))
        views = [None if key not in out else out[key][r0:r1]
                 for key in ("logprobs", "entropy", "lse", "mean_logits", "is_top1", "log_sum_sq_probs")]
        row_stats(z, targets[r0:r1], temperature, never, want_mean, want_top1, want_lssp, out=views)
    return out


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b``; ``a``/``b`` in the compute dtype, ``out`` in it or in fp32.

    One GEMM with fp32 accumulation inside (cuBLAS), no temporary: a half-precision ``out`` is rounded once per call,
    an fp32 ``out`` with half operands uses ``addmm(..., out_dtype=float32)`` on CUDA.
    """
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32:
        if not accumulate:
            out.zero_()
        addmm_f32(out, a, b)
    else:  # e.g. fp16 parameters under a bf16 autocast: through an fp32 temporary
        prod = a.float() @ b.float()
        out.add_(prod) if accumulate else out.copy_(prod)


def _dz_gemm(buf, h, w, b, targets, c0, lse, ent, g_lp, g_h, temperature, cdt):
    """The "gemm" mode's ``dz`` of one chunk: the fp32 logits ``h @ w.T (+ b)`` by one GEMM into ``buf``, then
    ``triton_logits.row_grad`` writes ``dz`` in the compute dtype **in place**: row ``r``'s values go to the first
    ``2 x cols`` bytes of its own fp32 row (the row kernel puts a barrier between each block's loads and its stores,
    so no warp overwrites logits another warp has yet to read), so ``dz`` is a strided ``[rows, cols]`` view
    (leading dimension ``2 x cols``) that cuBLAS takes as is.
    ``c0``: the chunk's first vocabulary column (a target outside ``[c0, c0 + cols)``: no indicator term here)."""
    from .triton_logits import row_grad

    rows, cols = h.shape[0], w.shape[0]
    z = logits_f32(h, w, b, out=buf[: rows * cols].view(rows, cols))
    if cdt == torch.float32:
        dz = z
    else:
        dz = z.view(cdt).view(rows, 2 * cols)[:, :cols]
    never = -(2**62)  # no local target is ignored: the ignored positions were compacted away
    return row_grad(z, targets, lse, ent, g_lp, g_h, temperature, never, dz, col_offset=c0)


def backward_plan(n: int, v: int, d: int, elem: int, need_h: bool, fp32_hidden_grad: bool,
                  buffer_bytes: int | None = None) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` of the backward for ``n`` valid tokens, ``elem`` bytes per ``dz`` element.

    The ``dz`` buffer ``token_chunk x vocab_chunk`` stays within :data:`DZ_BUFFER_BYTES`. The token chunk is all
    tokens unless ``grad_hidden`` must be accumulated over vocabulary chunks in an fp32 buffer
    (``need_h`` and a half-precision hidden state): then at most :data:`ACC_BYTES` ``/ (4 d)`` tokens (at least
    :data:`MIN_TOKEN_CHUNK`). One token chunk means ``grad_weight`` is written by one GEMM per vocabulary chunk.
    The "gemm" mode passes ``elem = 4`` and ``buffer_bytes = GEMM_BUFFER_BYTES``: its buffer holds fp32 logits.
    """
    dz_elems = max(1, (DZ_BUFFER_BYTES if buffer_bytes is None else buffer_bytes) // elem)
    if n * v <= dz_elems:
        return max(n, 1), v
    tc = n
    if need_h and not fp32_hidden_grad:
        tc = min(n, max(MIN_TOKEN_CHUNK, ACC_BYTES // (4 * d)))
    vc = dz_elems // tc // VOCAB_ALIGN * VOCAB_ALIGN
    if vc >= v:  # the whole vocabulary in one chunk: grad_hidden needs no accumulator, so take more tokens
        return min(n, max(tc, dz_elems // v)), v
    if vc < VOCAB_ALIGN:  # too many tokens for even one aligned vocabulary chunk: fewer tokens per chunk
        vc = VOCAB_ALIGN
        tc = max(1, min(tc, dz_elems // vc))
    return tc, min(v, vc)


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
            mode = head_mode(dev)
            if n_valid > 0:
                fwd = _forward_stats_gemm if mode == "gemm" else _forward_stats
                stats = fwd(h_v, weight, bias, t_v, temperature, compute_dtype, *want)
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
        ctx.mode = mode
        ctx.mark_non_differentiable(*extras)
        return (*outs, *extras)

    @staticmethod
    def backward(ctx, g_lp, g_h, *_unused):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 8
        if (g_lp is None and g_h is None) or not (need_h or need_w or need_b):
            return nones
        hidden, weight, bias, idx, t_v, lse_v, ent_v = ctx.saved_tensors
        with gathered_params(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            grads = _linear_backward(hidden, weight, bias, idx, t_v, lse_v, ent_v, g_lp, g_h, ctx.temperature,
                                     ctx.compute_dtype, need_h, need_w, need_b, ctx.mode)
        return (*grads, *nones[3:])


def _linear_backward(hidden, weight, bias, idx, t_v, lse_v, ent_v, g_lp, g_h, temperature, cdt, need_h, need_w,
                     need_b, mode="tiles"):
    """``(grad_hidden, grad_weight, grad_bias)`` (None where not needed) by :func:`backward_plan`'s chunks."""
    n, d = hidden.shape
    dev = hidden.device
    v = weight.shape[0]
    n_valid = lse_v.shape[0]
    if n_valid == 0:  # every position ignored: all gradients are zero
        return (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None)

    def pick(g):
        if g is None:
            return None
        g = g.float()
        return (g if idx is None else g.index_select(0, idx)).contiguous()

    g_lp_v, g_h_v = pick(g_lp), pick(g_h)
    h_v = hidden if idx is None else hidden.index_select(0, idx)
    gemm_mode = mode == "gemm"
    if gemm_mode:
        tc, vc = backward_plan(n_valid, v, d, 4, need_h, hidden.dtype == torch.float32, GEMM_BUFFER_BYTES)
    else:
        tc, vc = backward_plan(n_valid, v, d, cdt.itemsize, need_h, hidden.dtype == torch.float32)
    n_tok_chunks = triton.cdiv(n_valid, tc)
    n_voc_chunks = triton.cdiv(v, vc)
    cfg = kernel_config("dz", dev, cdt)
    buf = torch.empty(min(tc, n_valid) * vc, device=dev, dtype=torch.float32 if gemm_mode else cdt)
    b_c = None if bias is None or not gemm_mode else bias.to(cdt)
    # grad_hidden of the valid rows: written per token chunk, through an fp32 accumulator over vocabulary chunks
    gh_v = gh_acc = gw = gw_acc = gb = None
    if need_h:
        gh_v = torch.empty(n_valid, d, device=dev, dtype=hidden.dtype)
        if n_voc_chunks > 1 and hidden.dtype != torch.float32:
            gh_acc = torch.empty(min(tc, n_valid), d, device=dev, dtype=torch.float32)
    if need_w:
        gw = torch.empty_like(weight)
        # Several token chunks: accumulate grad_weight in fp32 when that fits, else in place in its own dtype
        # (one rounding per token chunk, as a bf16 GEMM with beta = 1 does).
        # The two fp32 accumulators share ACC_BYTES, so the extra memory stays <= DZ_BUFFER_BYTES + ACC_BYTES.
        acc_left = ACC_BYTES - (0 if gh_acc is None else gh_acc.numel() * 4)
        if n_tok_chunks > 1 and weight.dtype != torch.float32 and v * d * 4 <= acc_left:
            gw_acc = torch.zeros(v, d, device=dev, dtype=torch.float32)
    if need_b:
        gb = torch.zeros(v, device=dev, dtype=torch.float32)
    dummy = lse_v
    for r0 in range(0, n_valid, tc):
        r1 = min(r0 + tc, n_valid)
        h_chunk = h_v[r0:r1]
        hc_chunk = h_chunk.to(cdt) if (need_w or gemm_mode) else None
        gh_out = None
        if need_h:
            gh_out = gh_v[r0:r1] if gh_acc is None else gh_acc[: r1 - r0]
        for ci, c0 in enumerate(range(0, v, vc)):
            c1 = min(c0 + vc, v)
            w_slice = weight[c0:c1].to(cdt)  # a view when the weight is in the compute dtype
            if gemm_mode:
                dz = _dz_gemm(buf, hc_chunk, w_slice, None if b_c is None else b_c[c0:c1],
                              t_v[r0:r1], c0, lse_v[r0:r1], ent_v[r0:r1],
                              None if g_lp_v is None else g_lp_v[r0:r1], None if g_h_v is None else g_h_v[r0:r1],
                              temperature, cdt)
            else:
                dz = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                grid = (triton.cdiv(r1 - r0, cfg.block_n) * triton.cdiv(c1 - c0, cfg.block_v),)
                _linear_dz_kernel[grid](
                    h_chunk, h_chunk.stride(0), h_chunk.stride(1),
                    w_slice, w_slice.stride(0), w_slice.stride(1),
                    dummy if bias is None else bias[c0:c1],
                    t_v[r0:r1], lse_v[r0:r1], ent_v[r0:r1],
                    dummy if g_lp_v is None else g_lp_v[r0:r1],
                    dummy if g_h_v is None else g_h_v[r0:r1],
                    dz, dz.stride(0),
                    r1 - r0, c1 - c0, d, c0, temperature,
                    HAS_BIAS=bias is not None,
                    HAS_G_LP=g_lp_v is not None,
                    HAS_G_H=g_h_v is not None,
                    GROUP=DZ_GROUP,
                    **_tile_launch_args(cfg, cdt, d, h_chunk.is_cuda),
                )  # fmt: skip
            if need_h:
                _gemm(gh_out, dz, w_slice, accumulate=ci > 0)
            if need_w:
                if gw_acc is not None:
                    _gemm(gw_acc[c0:c1], dz.t(), hc_chunk, accumulate=True)
                else:
                    _gemm(gw[c0:c1], dz.t(), hc_chunk, accumulate=r0 > 0)
            if need_b:
                gb[c0:c1] += dz.sum(0, dtype=torch.float32)
        if gh_acc is not None:
            gh_v[r0:r1].copy_(gh_acc[: r1 - r0])
    grad_hidden = grad_weight = grad_bias = None
    if need_h:
        if idx is None:
            grad_hidden = gh_v
        else:
            grad_hidden = torch.zeros(n, d, device=dev, dtype=hidden.dtype)
            grad_hidden.index_copy_(0, idx, gh_v)
    if need_w:
        grad_weight = gw if gw_acc is None else gw.copy_(gw_acc)
    if need_b:
        grad_bias = gb.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


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
