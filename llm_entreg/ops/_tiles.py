"""Tile helpers shared by the chunked, Triton-head and loss-fused paths: fp32 logits tiles, fp32-accumulating GEMMs,
and the per-tile gradient ``dz``. The math is in docs/kernels.md ("The combined backward").
"""

from __future__ import annotations

import torch

#: Log-probs below this have ``p == 0`` in fp32; clamping them avoids ``0 * -inf`` in the gradient.
NEG_CLAMP = -1.0e4
#: Stands in for ``-inf`` shifted logits in the forward (``exp`` gives 0, and ``0 *`` it gives 0).
NEG_BIG = -1.0e30


def _torch_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return True
    return got >= (major, minor)


# Whether ``torch.mm(..., out_dtype=float32)`` / ``torch.addmm(..., out_dtype=float32)`` work (torch >= 2.8);
# cleared when a call fails.
_OUT_DTYPE_MM = [_torch_at_least(2, 8)]
_OUT_DTYPE_ADDMM = [True]


def mm_out_dtype_available() -> bool:
    """Whether ``torch.mm(..., out_dtype=float32)`` is usable here (torch >= 2.8, and no call has failed).

    The Triton head's gemm mode is the CUDA default only while it is.
    """
    return _OUT_DTYPE_MM[0]


def logits_tile(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``h @ w.T + b``; for half-precision operands an **fp32** result (fp32 accumulation, not rounded to bf16/fp16).

    Rounding the logits to bf16 would move log-probs by ~1e-2 (the spacing of bf16 near |z| ~ 10): a 1% error in
    PPO/GRPO ratios. The Triton head keeps its tiles in fp32; this keeps the torch paths equal to it. CUDA:
    ``torch.mm(..., out_dtype=float32)``; CPU: the operands upcast first (products of half-precision values are
    exact in fp32). fp32 and fp64 operands: the plain product in their dtype. ``b`` is in the operands' dtype.
    ``out``: a buffer of the result's shape and dtype to write into instead of a new tensor.
    """
    where = {} if out is None else {"out": out}
    if h.dtype in (torch.float32, torch.float64):
        return torch.mm(h, w.t(), **where) if b is None else torch.addmm(b, h, w.t(), **where)
    z = None
    if h.is_cuda and _OUT_DTYPE_MM[0]:
        try:
            z = torch.mm(h, w.t(), out_dtype=torch.float32, **where)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm(out_dtype=): upcast instead
            _OUT_DTYPE_MM[0] = False
    if z is None:
        z = torch.mm(h.float(), w.float().t(), **where)
    if b is not None:
        z.add_(b)
    return z


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator; half-precision products are not rounded before the sum."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b.float() if b.dtype != torch.float32 else b)
        return
    if acc.device.type == "cuda" and _OUT_DTYPE_ADDMM[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without addmm(out_dtype=): upcast instead
            _OUT_DTYPE_ADDMM[0] = False
    acc.addmm_(a.float(), b.float())


def grad_tile(
    z: torch.Tensor,
    local_targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_h: torch.Tensor | None,
    inv_t: float,
    guard: bool,
) -> torch.Tensor:
    """``dL/d(raw logits)`` for an fp32 tile ``z = logits / T`` (overwritten, and returned as ``dz``).

    ``dz = (1/T) [g_lp (1[i=y] - p) - g_H p (log p + H)]``; ``local_targets`` are the targets relative to the
    tile's first column (outside ``[0, v)``: not in this tile); ``guard`` clamps ``log p`` where ``-inf`` logits may
    occur.
    """
    n, v = z.shape
    logp = z.sub_(lse.unsqueeze(1))
    p = torch.exp(logp)
    if g_h is not None:
        if guard:
            logp.clamp_(min=NEG_CLAMP)
        # dz = -p * (g_lp + g_H (log p + H)) + g_lp 1[i=y]
        coef = logp.add_(entropy.unsqueeze(1)).mul_(g_h.unsqueeze(1))
        if g_lp is not None:
            coef.add_(g_lp.unsqueeze(1))
        dz = coef.mul_(p).neg_()
    else:
        dz = p.mul_(-g_lp.unsqueeze(1))
    if g_lp is not None:  # + g_lp at each row's target column, where it falls in this tile (no data-dependent shapes)
        in_tile = (local_targets >= 0) & (local_targets < v)
        picked = torch.where(in_tile, g_lp, torch.zeros((), dtype=g_lp.dtype, device=g_lp.device))
        dz.scatter_add_(1, local_targets.clamp(0, v - 1).unsqueeze(1), picked.unsqueeze(1).to(dz.dtype))
    if inv_t != 1.0:
        dz.mul_(inv_t)
    return dz
