"""Loss-fused LM head: the gradient of a closed-form per-token loss of ``(log p_y, H)`` is formed in the forward
pass, one token chunk of whole-vocabulary logits at a time (6NdV instead of 8NdV). Theory, memory and what
``loss_fn`` may do: docs/kernels.md ("Loss-fused head").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._common import TokenStats, check_linear, gathered_params, resolve_backend
from ._tiles import NEG_BIG, addmm_f32, grad_tile, logits_tile
from .chunked import VOCAB_CHUNK
from .reference import reference_linear_token_stats


class _LazyTritonLogits:
    """:mod:`.triton_logits`, imported on first use (importing triton must wait for ``TRITON_INTERPRET``)."""

    def __getattr__(self, name):
        from . import triton_logits as mod

        return getattr(mod, name)


triton_logits = _LazyTritonLogits()

#: Default memory budget of one token chunk's stored logits (+ their half-precision ``dz`` copy), in bytes.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: The default budget on CUDA (docs/kernels.md: fewer, larger chunks keep the fp32 grad_weight traffic low).
CUDA_CHUNK_BUDGET_BYTES = 2**30
#: Token chunks above this size are rounded down to a multiple of it (GEMM-friendly shapes).
_CHUNK_ALIGN = 64
FUSED_LOSS_BACKENDS = ("auto", "chunked", "triton", "torch")

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "CUDA_CHUNK_BUDGET_BYTES",
    "FUSED_LOSS_BACKENDS",
    "LossFn",
    "fused_linear_loss",
    "token_chunk_for_budget",
]


def _stat_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Statistics (and gradient accumulators) in fp32, or fp64 when the inputs are fp64 (exact tests)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def token_chunk_for_budget(n_vocab: int, compute_dtype: torch.dtype, budget_bytes: int) -> int:
    """Tokens per chunk such that the stored ``[n, V]`` logits (and a half-precision ``dz`` copy) fit the budget."""
    stat = _stat_dtype(compute_dtype)
    per_elem = stat.itemsize + (compute_dtype.itemsize if compute_dtype != stat else 0)
    n = max(1, budget_bytes // max(1, n_vocab * per_elem))
    if n > _CHUNK_ALIGN:
        n -= n % _CHUNK_ALIGN
    return n


def _logits_into(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``h @ w.T + b`` as a fresh ``dtype`` tensor (fp32 from half-precision operands: :func:`._tiles.logits_tile`)."""
    return logits_tile(h, w, b).to(dtype)


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (accumulator in fp32 or fp64)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b if b.dtype == acc.dtype else b.to(acc.dtype))
    else:
        addmm_f32(acc, a, b)


def _chunk_stats(z: torch.Tensor, tgt: torch.Tensor, guard: bool, vsub: int):
    """Statistics of a stored chunk ``z = logits / T`` ``[n, V]``, which is shifted in place to ``z - m``.

    Returns ``(logprobs, entropy, log_s)``; ``log_s`` is the ``lse`` of the shifted chunk.
    """
    n, n_vocab = z.shape
    m = z.max(1).values
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(shift.unsqueeze(1))
    if guard:  # -inf logits (masked vocabulary): exp gives 0 and 0 * (-1e30) is 0, never NaN
        z.clamp_(min=NEG_BIG)
    s = torch.zeros(n, dtype=z.dtype, device=z.device)
    t = torch.zeros_like(s)
    for v0 in range(0, n_vocab, vsub):
        blk = z[:, v0 : v0 + vsub]
        e = torch.exp(blk)
        s += e.sum(1)
        t += e.mul_(blk).sum(1)  # sum_i e_i (z_i - m)
    log_s = torch.log(s)
    entropy = log_s - t / s
    logprobs = z.gather(1, tgt.unsqueeze(1)).squeeze(1) - log_s
    return logprobs, entropy, log_s


def chunk_spans(rows: torch.Tensor, groups: torch.Tensor | None, token_chunk: int):
    """``(rows in processing order, [(r0, r1), ...])``: consecutive spans of at most ``token_chunk`` valid tokens;
    with ``groups`` (a group id per position), tokens are ordered by group and a span holds whole groups only (a
    group larger than ``token_chunk`` gets a span of its own)."""
    n = rows.numel()
    if groups is None:
        return rows, [(r0, min(r0 + token_chunk, n)) for r0 in range(0, n, token_chunk)]
    g = groups.index_select(0, rows)
    order = torch.sort(g, stable=True).indices
    rows, g = rows[order], g[order]
    _, sizes = torch.unique_consecutive(g, return_counts=True)
    spans, r0, r1 = [], 0, 0
    for size in sizes.tolist():
        if r1 > r0 and r1 + size - r0 > token_chunk:
            spans.append((r0, r1))
            r0 = r1
        r1 += size
    if r1 > r0:
        spans.append((r0, r1))
    return rows, spans


def _chunk_extras(z: torch.Tensor, tgt: torch.Tensor, extras) -> dict[str, torch.Tensor]:
    """The no-grad extras of a stored chunk of scaled logits (before any shift)."""
    out = {}
    if "mean_logits" in extras:
        out["mean_logits"] = z.mean(1)
    if "is_top1" in extras:
        out["is_top1"] = z.argmax(1) == tgt
    return out


def _chunk_loss_grads(loss_fn: LossFn, lp: torch.Tensor, ent: torch.Tensor, rows: torch.Tensor):
    """Run ``loss_fn`` on detached leaves; return ``(chunk loss (detached), g_lp or None, g_H or None)``."""
    with torch.enable_grad():
        lp_leaf = lp.detach().requires_grad_(True)
        ent_leaf = ent.detach().requires_grad_(True)
        per_token = loss_fn(lp_leaf, ent_leaf, rows)
        if not isinstance(per_token, torch.Tensor) or tuple(per_token.shape) != tuple(lp.shape):
            got = tuple(per_token.shape) if isinstance(per_token, torch.Tensor) else type(per_token)
            raise ValueError(
                f"loss_fn: must return a per-token tensor of shape [{lp.shape[0]}] (one value per token of the "
                f"chunk), got {got}"
            )
        total = per_token.sum()
        if not total.requires_grad:
            return total.detach(), None, None
        g_lp, g_h = torch.autograd.grad(total, [lp_leaf, ent_leaf], allow_unused=True)
    return total.detach(), g_lp, g_h


@dataclass(frozen=True)
class _HeadRun:
    """The settings every chunk of one fused forward shares."""

    temperature: float
    ignore_index: int
    compute_dtype: torch.dtype
    stat_dtype: torch.dtype
    use_triton: bool
    guard: bool  # the bias holds -inf entries
    vsub: int  # vocabulary sub-block of the chunked path
    extras: tuple[str, ...]

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature


def _chunk_forward(run: _HeadRun, z: torch.Tensor, tgt_c: torch.Tensor, rows_c: torch.Tensor, extra_full: dict):
    """``(logprobs, entropy, norm)`` of a stored chunk of raw logits (its extras written into ``extra_full``);
    ``norm`` is what :func:`_chunk_dz` needs: the ``lse`` (Triton) or the shifted chunk's ``log_s`` (chunked)."""
    if run.use_triton:  # the extras come from the same read pass as the statistics
        lp, ent, lse, mean, top1, _ = triton_logits.row_stats(
            z, tgt_c, run.temperature, run.ignore_index,
            want_mean="mean_logits" in run.extras, want_top1="is_top1" in run.extras,
        )  # fmt: skip
        for key, value in (("mean_logits", mean), ("is_top1", top1)):
            if value is not None:
                extra_full[key].index_copy_(0, rows_c, value.to(extra_full[key].dtype))
        return lp, ent, lse
    if run.inv_t != 1.0:
        z.mul_(run.inv_t)
    for key, value in _chunk_extras(z, tgt_c, run.extras).items():
        extra_full[key].index_copy_(0, rows_c, value.to(extra_full[key].dtype))
    return _chunk_stats(z, tgt_c, run.guard, run.vsub)


def _chunk_dz(run: _HeadRun, z, tgt_c, norm, ent, g_lp, g_h, dz_buf, gb) -> torch.Tensor:
    """The chunk's ``dL/dz`` in the compute dtype (in place in ``z`` where it can); its column sums go to ``gb``."""
    if run.use_triton:  # dz straight into the compute dtype (in place when that is fp32)
        out = z if dz_buf is None else dz_buf[: z.numel()].view(z.shape)
        dz_c = triton_logits.row_grad(z, tgt_c, norm, ent, g_lp, g_h, run.temperature, run.ignore_index, out)
        if gb is not None:
            gb += dz_c.sum(0, dtype=run.stat_dtype)
        return dz_c
    for v0 in range(0, z.shape[1], run.vsub):  # dz in place in the stored chunk, sub-block by sub-block
        blk = z[:, v0 : v0 + run.vsub]
        dz = grad_tile(blk, tgt_c - v0, norm, ent, g_lp, g_h, run.inv_t, run.guard)
        if dz.data_ptr() != blk.data_ptr():
            blk.copy_(dz)
    if gb is not None:
        gb += z.sum(0)
    return z if run.compute_dtype == run.stat_dtype else z.to(run.compute_dtype)


def _run_chunks(run: _HeadRun, inputs, rows, groups, token_chunk: int, loss_fn: LossFn, stats, grads):
    """Loop over the token chunks: per-token statistics into ``stats``, gradients into ``grads``; the loss sum."""
    hidden, weight, bias, targets = inputs
    lp_full, ent_full, extra_full = stats
    grad_hidden, gw, gb = grads
    sdt, cdt, dev = run.stat_dtype, run.compute_dtype, hidden.device
    # with groups (DPO pairs) the tokens of one group sit side by side, so a chunk holds whole groups
    rows, spans = chunk_spans(rows, groups, token_chunk)
    h = hidden.index_select(0, rows).to(cdt)
    tgt = targets.index_select(0, rows).long()
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    dz_buf = None
    if run.use_triton and cdt != sdt:
        dz_buf = torch.empty(max(r1 - r0 for r0, r1 in spans) * weight.shape[0], dtype=cdt, device=dev)
    loss = torch.zeros((), dtype=sdt, device=dev)
    for r0, r1 in spans:
        h_c, tgt_c, rows_c = h[r0:r1], tgt[r0:r1], rows[r0:r1]
        z = _logits_into(h_c, w, b, sdt)  # the chunk's [n, V] logits: the one logits GEMM (2ndV)
        lp, ent, norm = _chunk_forward(run, z, tgt_c, rows_c, extra_full)
        lp_full.index_copy_(0, rows_c, lp.to(sdt))
        ent_full.index_copy_(0, rows_c, ent.to(sdt))
        chunk_loss, g_lp, g_h = _chunk_loss_grads(loss_fn, lp, ent, rows_c)
        loss = loss + chunk_loss
        if (g_lp is None and g_h is None) or all(g is None for g in grads):
            continue
        g_lp = None if g_lp is None else g_lp.to(sdt).contiguous()
        g_h = None if g_h is None else g_h.to(sdt).contiguous()
        dz_c = _chunk_dz(run, z, tgt_c, norm, ent, g_lp, g_h, dz_buf, gb)
        del z
        if grad_hidden is not None:  # 2ndV
            gh_c = torch.zeros(r1 - r0, hidden.shape[1], dtype=sdt, device=dev)
            _acc_mm(gh_c, dz_c, w)
            grad_hidden.index_copy_(0, rows_c, gh_c.to(hidden.dtype))
        if gw is not None:  # 2ndV
            _acc_mm(gw, dz_c.t(), h_c)
    return loss


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, loss_fn, cfg, groups, weight_grad):
        temperature, ignore_index, compute_dtype, token_chunk, need, use_triton, extras = cfg
        need_h, need_w, need_b = need
        ctx.set_materialize_grads(False)
        n_all, dev = hidden.shape[0], hidden.device
        sdt = _stat_dtype(compute_dtype)
        rows = torch.nonzero(targets != ignore_index).squeeze(1)
        lp_full = torch.zeros(n_all, dtype=sdt, device=dev)
        ent_full = torch.zeros(n_all, dtype=sdt, device=dev)
        extra_full = {k: torch.zeros(n_all, dtype=torch.bool if k == "is_top1" else sdt, device=dev) for k in extras}
        loss = torch.zeros((), dtype=sdt, device=dev)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        gw = gb = None
        with gathered_params(weight, bias), torch.autocast(dev.type, enabled=False):
            guard = bias is not None and bool(torch.isneginf(bias).any())
            vsub = VOCAB_CHUNK["cuda" if dev.type == "cuda" else "cpu"]
            run = _HeadRun(temperature, ignore_index, compute_dtype, sdt, use_triton, guard, vsub, extras)
            if need_w:  # straight into the caller's fp32 buffer (the weight's own .grad) when given: no second [V, d]
                gw = weight_grad if weight_grad is not None else torch.zeros(weight.shape, dtype=sdt, device=dev)
            if need_b and bias is not None:
                gb = torch.zeros(weight.shape[0], dtype=sdt, device=dev)
            if rows.numel():
                loss = _run_chunks(run, (hidden, weight, bias, targets), rows, groups, token_chunk, loss_fn,
                                   (lp_full, ent_full, extra_full), (grad_hidden, gw, gb))
        ctx.grads = (
            grad_hidden,
            None if gw is None or weight_grad is not None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
        )
        ctx.accumulated_into_weight_grad = weight_grad is not None and gw is not None
        outs = [extra_full[k] for k in extras]  # extras come ordered (mean_logits, is_top1) from fused_linear_loss
        ctx.mark_non_differentiable(lp_full, ent_full, *outs)
        return (loss, lp_full, ent_full, *outs)

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if g_loss is None:
            return (None,) * 8
        if ctx.accumulated_into_weight_grad and float(g_loss) != 1.0:
            raise RuntimeError("fused_linear_loss(weight_grad=...): the loss was scaled after the op; scale loss_fn "
                               "instead (the weight's gradient was accumulated in the forward)")
        scaled = tuple(None if g is None else g * g_loss.to(g.dtype) for g in ctx.grads)
        return (*scaled, None, None, None, None, None)


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    token_chunk: int | None = None,
    chunk_budget_bytes: int | None = None,
    groups: torch.Tensor | None = None,
    extras: tuple[str, ...] = (),
    weight_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TokenStats]:
    """``sum`` of a closed-form per-token loss of the LM head's log-probs and entropies, gradients formed in forward.

    Args:
        hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None (``-inf`` entries mask tokens out).
        targets: ``[N]`` token ids; ``ignore_index`` positions are skipped (no loss, zero gradient).
        loss_fn: ``(logprobs [n], entropy [n], rows [n]) -> per_token_loss [n]``, differentiable in the first two;
            called once per token chunk on its valid tokens (``rows``: their positions in ``[0, N)``). See the
            docs/kernels.md ("Loss-fused head") for what it may capture and why DPO needs whole pairs.
        temperature: the policy is ``softmax(logits / temperature)``.
        backend: ``"auto"`` (``"triton"`` on CUDA, else ``"chunked"``), ``"chunked"`` (torch elementwise ops on the
            stored chunk), ``"triton"`` (row kernels on the stored chunk) or ``"torch"`` (materialized reference).
        token_chunk: tokens per chunk; default: as many as fit ``chunk_budget_bytes`` (``n x V`` stored logits).
        chunk_budget_bytes: memory budget of one chunk's stored logits (docs/kernels.md); default
            :data:`CUDA_CHUNK_BUDGET_BYTES` on CUDA, :data:`CHUNK_BUDGET_BYTES` elsewhere.
        groups: ``[N]`` group ids (e.g. the DPO pair of each position): a chunk then holds whole groups, so
            ``loss_fn`` sees every token of a group at once (a group above ``token_chunk`` gets a chunk alone).
        extras: ``mean_logits`` / ``is_top1`` of every token, from the stored chunks (no grad).
        weight_grad: a float32 ``[V, d]`` tensor (the weight's own ``.grad``) to accumulate the weight's gradient
            into during the forward instead of a second ``[V, d]`` buffer; the backward then returns no weight
            gradient and requires the loss to be used unscaled (``d out / d loss = 1``).

    Returns:
        ``(loss, stats)``: the 0-dim loss (float32, float64 for float64 inputs), differentiable w.r.t. ``hidden``,
        ``weight``, ``bias`` (its backward only scales gradients computed in the forward), and the per-token
        ``TokenStats(logprobs, entropy)`` ``[N]`` in the loss dtype (detached; 0 at ignored positions) for logging.
    """
    compute_dtype, backend, chunk_budget_bytes = _check_fused_args(
        hidden, weight, bias, targets, loss_fn,
        (temperature, ignore_index, backend, token_chunk, chunk_budget_bytes, groups, weight_grad),
    )  # fmt: skip
    extras = tuple(e for e in ("mean_logits", "is_top1") if e in extras)
    if backend == "torch":
        return _reference_fused_loss(hidden, weight, bias, targets, loss_fn, compute_dtype,
                                     (temperature, ignore_index, extras))
    tc = token_chunk or token_chunk_for_budget(weight.shape[0], compute_dtype, chunk_budget_bytes)
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (hidden, weight, bias))
    cfg = (float(temperature), int(ignore_index), compute_dtype, tc, need, backend == "triton", extras)
    groups = None if groups is None else groups.reshape(-1).to(hidden.device)
    loss, lp, ent, *rest = _FusedLinearLoss.apply(hidden, weight, bias, targets.reshape(-1), loss_fn, cfg, groups,
                                                  weight_grad if need[1] else None)
    return loss, TokenStats(lp, ent, **dict(zip(extras, rest)))


def _check_weight_grad(weight_grad, weight, compute_dtype, backend: str) -> None:
    if weight_grad is None:
        return
    if backend == "torch":
        raise ValueError("weight_grad: the torch backend differentiates through autograd; pass weight_grad=None")
    sdt = _stat_dtype(compute_dtype)
    if weight_grad.dtype != sdt or tuple(weight_grad.shape) != tuple(weight.shape):
        raise ValueError(f"weight_grad: expected a {sdt} tensor shaped like the weight {tuple(weight.shape)}, got "
                         f"{weight_grad.dtype} {tuple(weight_grad.shape)}")


def _check_fused_args(hidden, weight, bias, targets, loss_fn, opts):
    """Check :func:`fused_linear_loss`'s arguments; ``(compute dtype, resolved backend, chunk budget)``."""
    temperature, ignore_index, backend, token_chunk, chunk_budget_bytes, groups, weight_grad = opts
    compute_dtype = check_linear(hidden, weight, bias, targets, temperature, ignore_index)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a callable (logprobs, entropy, rows) -> per-token loss, got {loss_fn!r}")
    if backend not in FUSED_LOSS_BACKENDS:
        raise ValueError(f"backend: expected one of {FUSED_LOSS_BACKENDS}, got {backend!r}")
    bad_chunk = isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk < 1
    if token_chunk is not None and bad_chunk:
        raise ValueError(f"token_chunk: expected a positive int or None, got {token_chunk!r}")
    if chunk_budget_bytes is None:
        chunk_budget_bytes = CUDA_CHUNK_BUDGET_BYTES if hidden.is_cuda else CHUNK_BUDGET_BYTES
    if isinstance(chunk_budget_bytes, bool) or not isinstance(chunk_budget_bytes, int) or chunk_budget_bytes < 1:
        raise ValueError(f"chunk_budget_bytes: expected a positive int, got {chunk_budget_bytes!r}")
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"hidden: compute dtype {compute_dtype} is not supported")
    if backend == "auto" and compute_dtype == torch.float64:
        backend = "chunked"  # the Triton kernels compute in fp32/bf16/fp16
    backend = resolve_backend(backend, hidden.device)  # auto -> triton on CUDA; refuses triton without triton
    if backend == "triton" and compute_dtype == torch.float64:
        raise ValueError("backend: 'triton' computes in fp32/bf16/fp16; use 'chunked' for float64 inputs")
    _check_weight_grad(weight_grad, weight, compute_dtype, backend)
    if groups is not None and tuple(groups.shape) != tuple(targets.reshape(-1).shape):
        raise ValueError(f"groups: expected one group id per position ({targets.numel()}), got {tuple(groups.shape)}")
    return compute_dtype, backend, chunk_budget_bytes


def _reference_fused_loss(hidden, weight, bias, targets, loss_fn, compute_dtype, opts):
    """The ``torch`` backend: materialized statistics, the loss differentiated by autograd."""
    temperature, ignore_index, extras = opts
    sdt = _stat_dtype(compute_dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        stats = reference_linear_token_stats(
            hidden.to(compute_dtype), weight.to(compute_dtype), targets,
            bias=None if bias is None else bias.to(compute_dtype),
            temperature=temperature, ignore_index=ignore_index, dtype=sdt, extras=extras,
        )  # fmt: skip
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    loss = torch.zeros((), dtype=sdt, device=hidden.device)
    if rows.numel():
        per_token = loss_fn(stats.logprobs[rows], stats.entropy[rows], rows)
        if not isinstance(per_token, torch.Tensor) or tuple(per_token.shape) != (rows.numel(),):
            raise ValueError(f"loss_fn: must return a per-token tensor of shape [{rows.numel()}]")
        loss = loss + per_token.sum()
    return loss, TokenStats(stats.logprobs.detach(), stats.entropy.detach(), mean_logits=stats.mean_logits,
                            is_top1=stats.is_top1)
