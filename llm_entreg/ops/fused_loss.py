"""Loss-fused LM head: the gradient of a closed-form per-token loss is formed in the forward pass (6NdV).

``fused_linear_loss(hidden, weight, targets, loss_fn)`` returns ``sum_t loss_fn(lp, H, rows)_t`` for the policy
``softmax((hidden @ weight.T + bias) / T)`` and, already in the forward, the gradients of that sum w.r.t. ``hidden``,
``weight`` and ``bias``. Its backward only scales the stored gradients by the incoming scalar gradient.

Why it is cheaper (FLOPs of the matmuls; ``N`` valid tokens, ``d`` hidden size, ``V`` vocabulary)
--------------------------------------------------------------------------------------------------
The recomputing fused head (:mod:`.chunked`, :mod:`.triton_linear`) keeps only ``(lse, H)`` per token:

- forward: logits ``2NdV``;
- backward: logits again ``2NdV``, ``grad_hidden = dz @ W`` ``2NdV``, ``grad_weight = dz^T @ h`` ``2NdV``;
- total ``8NdV``. It must recompute because ``dz`` needs ``g_lp``/``g_H``, which exist only after the whole loss.

When the per-token loss is a known function of ``(lp, H)`` the upstream gradients ``g_lp = dL/dlp`` and
``g_H = dL/dH`` of a token are available as soon as that token's ``lse`` and ``H`` are, i.e. after one full pass
over its vocabulary. Recomputing the tiles inside the forward (a second tile pass after the statistics) would
still cost ``8NdV``. So this module keeps the **whole-vocabulary logits of one token chunk** in memory instead:

- per token chunk of ``n`` tokens: logits ``[n, V]`` once (``2ndV``), ``lse``/``H``/``lp`` from the stored chunk,
  ``g_lp``/``g_H`` by autograd on the tiny per-token graph of ``loss_fn``, ``dz`` formed in place in the stored
  chunk, then ``grad_hidden[chunk] = dz @ W`` (``2ndV``) and ``grad_weight += dz^T @ h`` (``2ndV``);
- total ``6NdV`` and no logits recompute in backward; ``4NdV`` when the weight is frozen (no ``grad_weight``
  GEMM: e.g. LoRA with a frozen LM head), ``2NdV`` when nothing needs a gradient (evaluation).

The price is memory: the chunk buffer ``n x V`` in the statistics dtype (fp32; fp64 for fp64 inputs) plus, for a
half-precision compute dtype, ``dz`` cast to it for the GEMMs — ``n`` is chosen so that these fit in
``chunk_budget_bytes`` (default :data:`CHUNK_BUDGET_BYTES`, 256 MiB: e.g. ~290 tokens for ``V = 151936`` in bf16;
vocabulary sub-block temporaries of :data:`.chunked.VOCAB_CHUNK` columns come on top). And the gradients live from
the forward to the backward: ``grad_weight [V, d]`` / ``grad_bias [V]`` in the parameters' dtypes and
``grad_hidden [N, d]`` in the hidden's dtype, where the recomputing path holds only ``(lse, H)`` per token.
The backward allocates one more copy of each (scaled by the incoming gradient; a copy, so a retained graph can run
backward twice).

Exactness and what ``loss_fn`` may do
-------------------------------------
``loss_fn(logprobs [n], entropy [n], rows [n]) -> per_token_loss [n]`` is called once per token chunk, on the
chunk's valid tokens only (``targets != ignore_index``; ignored tokens never reach it and contribute 0). ``rows``
are the tokens' positions in ``[0, N)``, so ``loss_fn`` can read per-token constants captured in a closure
(advantages, old log-probs, masks, weights). The total loss is the sum of all returned values; fold any normalizer
(global token count, ...) into ``loss_fn``. The result is exact (same value and gradients as autograd through
:func:`.reference.reference_linear_token_stats` + ``loss_fn``) whenever the total is a sum over token chunks of a
function of that chunk's statistics — always the case for a per-token loss.

Captured tensors are constants: they get no gradient (a learned coefficient needs its own loss, as SAC's log-α has).

DPO does not fit. Its loss ``-log sigmoid(beta [(sum lp_c - sum lp_ref_c) - (sum lp_r - sum lp_ref_r)])`` couples
every token of the chosen and the rejected sequence: a token's ``g_lp`` depends on sequence sums that are complete
only after all chunks holding those sequences were seen. A chunk boundary inside a pair makes the per-chunk autograd
see partial sums (wrong gradients), and token chunks follow the compacted valid tokens, not sequence boundaries.
Getting those sums first and then the gradients needs the logits twice (the ``8NdV`` of the recomputing path), so
DPO uses :func:`llm_entreg.ops.linear_logprob_and_entropy` (sequence sums of its outputs) instead.

Backends:

- ``"chunked"``: plain torch on the stored chunk (several elementwise passes over ``[n, V]``), cuBLAS GEMMs on GPU;
- ``"triton"``: the same chunk loop, but the chunk's statistics and ``dz`` come from the row kernels of
  :mod:`.triton_logits` (one read pass for ``lse``/``H``/``lp``, one read + one half-precision write for ``dz``), so
  the elementwise work moves ``~10`` bytes per logit instead of ``~70``; fp32/bf16/fp16 inputs;
- ``"torch"``: materializes the ``[N, V]`` logits and runs ordinary autograd through the reference (tests, debugging);
- ``"auto"``: ``"triton"`` on CUDA when Triton imports, else ``"chunked"``.

On CUDA the default chunk budget is :data:`CUDA_CHUNK_BUDGET_BYTES` (1 GiB, ~1150 tokens at ``V = 151936``): each
token chunk adds ``dz^T h`` into the fp32 ``grad_weight`` accumulator (one ``addmm(..., out_dtype=float32)``, which
reads and writes the ``[V, d]`` fp32 accumulator), so fewer, larger chunks keep that traffic under the GEMM's time.
The fp32 ``[V, d]`` accumulator itself (2.3 GiB at ``V = 151936, d = 4096``) is the memory price of this path.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._common import TokenStats, gathered_params
from .chunked import _NEG_BIG, VOCAB_CHUNK, _addmm_f32, _grad_tile, _logits_tile
from .reference import reference_linear_token_stats


class _LazyTritonLogits:
    """:mod:`.triton_logits`, imported on first use (importing triton must wait for ``TRITON_INTERPRET``)."""

    def __getattr__(self, name):
        from . import triton_logits as mod

        return getattr(mod, name)


triton_logits = _LazyTritonLogits()

#: Default memory budget of one token chunk's stored logits (+ their half-precision ``dz`` copy), in bytes.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: The default budget on CUDA (see the module docstring).
CUDA_CHUNK_BUDGET_BYTES = 2**30
#: Token chunks above this size are rounded down to a multiple of it (GEMM-friendly shapes).
_CHUNK_ALIGN = 64
FUSED_LOSS_BACKENDS = ("auto", "chunked", "triton", "torch")

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "CUDA_CHUNK_BUDGET_BYTES",
    "FUSED_LOSS_BACKENDS",
    "fused_linear_loss",
    "ppo_clip_token_loss",
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
    """``h @ w.T + b`` as a fresh ``dtype`` tensor (fp32 from half-precision operands: :func:`.chunked._logits_tile`)."""
    return _logits_tile(h, w, b).to(dtype)


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (accumulator in fp32 or fp64)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b if b.dtype == acc.dtype else b.to(acc.dtype))
    else:
        _addmm_f32(acc, a, b)


def _chunk_stats(z: torch.Tensor, tgt: torch.Tensor, guard: bool, vsub: int):
    """Statistics of a stored chunk ``z = logits / T`` ``[n, V]``, which is shifted in place to ``z - m``.

    Returns ``(logprobs, entropy, log_s)``; ``log_s`` is the ``lse`` of the shifted chunk.
    """
    n, n_vocab = z.shape
    m = z.max(1).values
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(shift.unsqueeze(1))
    if guard:  # -inf logits (masked vocabulary): exp gives 0 and 0 * (-1e30) is 0, never NaN
        z.clamp_(min=_NEG_BIG)
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


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, loss_fn, cfg):
        temperature, ignore_index, compute_dtype, token_chunk, need, use_triton = cfg
        need_h, need_w, need_b = need
        ctx.set_materialize_grads(False)
        n_all, d = hidden.shape
        dev = hidden.device
        sdt = _stat_dtype(compute_dtype)
        inv_t = 1.0 / temperature
        rows = torch.nonzero(targets != ignore_index).squeeze(1)
        n_valid = rows.numel()
        lp_full = torch.zeros(n_all, dtype=sdt, device=dev)
        ent_full = torch.zeros(n_all, dtype=sdt, device=dev)
        loss = torch.zeros((), dtype=sdt, device=dev)
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        gw = gb = None
        with gathered_params(weight, bias), torch.autocast(dev.type, enabled=False):
            n_vocab = weight.shape[0]
            guard = bias is not None and bool(torch.isneginf(bias).any())
            vsub = VOCAB_CHUNK["cuda" if dev.type == "cuda" else "cpu"]
            tc = token_chunk
            if need_w:
                gw = torch.zeros(weight.shape, dtype=sdt, device=dev)
            if need_b and bias is not None:
                gb = torch.zeros(n_vocab, dtype=sdt, device=dev)
            if n_valid:
                h = hidden.index_select(0, rows).to(compute_dtype)
                tgt = targets.index_select(0, rows).long()
                w = weight.to(compute_dtype)
                b = None if bias is None else bias.to(compute_dtype)
                dz_buf = None
                if use_triton and compute_dtype != sdt:
                    dz_buf = torch.empty(min(tc, n_valid) * n_vocab, dtype=compute_dtype, device=dev)
                for r0 in range(0, n_valid, tc):
                    r1 = min(r0 + tc, n_valid)
                    h_c, tgt_c, rows_c = h[r0:r1], tgt[r0:r1], rows[r0:r1]
                    z = _logits_into(h_c, w, b, sdt)  # the chunk's [n, V] logits: the one logits GEMM (2ndV)
                    if use_triton:
                        lp, ent, lse, *_ = triton_logits.row_stats(z, tgt_c, temperature, ignore_index)
                    else:
                        if inv_t != 1.0:
                            z.mul_(inv_t)
                        lp, ent, log_s = _chunk_stats(z, tgt_c, guard, vsub)
                    lp_full.index_copy_(0, rows_c, lp.to(sdt))
                    ent_full.index_copy_(0, rows_c, ent.to(sdt))
                    chunk_loss, g_lp, g_h = _chunk_loss_grads(loss_fn, lp, ent, rows_c)
                    loss = loss + chunk_loss
                    if (g_lp is None and g_h is None) or not (need_h or need_w or gb is not None):
                        continue
                    g_lp = None if g_lp is None else g_lp.to(sdt).contiguous()
                    g_h = None if g_h is None else g_h.to(sdt).contiguous()
                    if use_triton:  # dz straight into the compute dtype (in place when that is fp32)
                        out = z if dz_buf is None else dz_buf[: z.numel()].view(z.shape)
                        dz_c = triton_logits.row_grad(z, tgt_c, lse, ent, g_lp, g_h, temperature, ignore_index, out)
                        if gb is not None:
                            gb += dz_c.sum(0, dtype=sdt)
                    else:
                        for v0 in range(0, n_vocab, vsub):  # dz in place in the stored chunk, sub-block by sub-block
                            blk = z[:, v0 : v0 + vsub]
                            dz = _grad_tile(blk, tgt_c - v0, log_s, ent, g_lp, g_h, inv_t, guard)
                            if dz.data_ptr() != blk.data_ptr():
                                blk.copy_(dz)
                        if gb is not None:
                            gb += z.sum(0)
                        dz_c = z if compute_dtype == sdt else z.to(compute_dtype)
                    del z
                    if need_h:  # 2ndV
                        gh_c = torch.zeros(r1 - r0, d, dtype=sdt, device=dev)
                        _acc_mm(gh_c, dz_c, w)
                        grad_hidden.index_copy_(0, rows_c, gh_c.to(hidden.dtype))
                    if need_w:  # 2ndV
                        _acc_mm(gw, dz_c.t(), h_c)
        ctx.grads = (
            grad_hidden,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
        )
        ctx.mark_non_differentiable(lp_full, ent_full)
        return loss, lp_full, ent_full

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if g_loss is None:
            return (None,) * 6
        scaled = tuple(None if g is None else g * g_loss.to(g.dtype) for g in ctx.grads)
        return (*scaled, None, None, None)


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
) -> tuple[torch.Tensor, TokenStats]:
    """``sum`` of a closed-form per-token loss of the LM head's log-probs and entropies, gradients formed in forward.

    Args:
        hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None (``-inf`` entries mask tokens out).
        targets: ``[N]`` token ids; ``ignore_index`` positions are skipped (no loss, zero gradient).
        loss_fn: ``(logprobs [n], entropy [n], rows [n]) -> per_token_loss [n]``, differentiable in the first two;
            called once per token chunk on its valid tokens (``rows``: their positions in ``[0, N)``). See the
            module docstring for what it may capture and why sequence-level losses (DPO) do not fit.
        temperature: the policy is ``softmax(logits / temperature)``.
        backend: ``"auto"`` (``"triton"`` on CUDA, else ``"chunked"``), ``"chunked"`` (torch elementwise ops on the
            stored chunk), ``"triton"`` (row kernels on the stored chunk) or ``"torch"`` (materialized reference).
        token_chunk: tokens per chunk; default: as many as fit ``chunk_budget_bytes`` (``n x V`` stored logits).
        chunk_budget_bytes: memory budget of one chunk's stored logits (see the module docstring); default
            :data:`CUDA_CHUNK_BUDGET_BYTES` on CUDA, :data:`CHUNK_BUDGET_BYTES` elsewhere.

    Returns:
        ``(loss, stats)``: the 0-dim loss (float32, float64 for float64 inputs), differentiable w.r.t. ``hidden``,
        ``weight``, ``bias`` (its backward only scales gradients computed in the forward), and the per-token
        ``TokenStats(logprobs, entropy)`` ``[N]`` in the loss dtype (detached; 0 at ignored positions) for logging.
    """
    from . import _check_linear, resolve_backend  # shared checks (late import: this module is exported there)

    compute_dtype = _check_linear(hidden, weight, bias, targets, temperature, ignore_index)
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

    if backend == "torch":
        sdt = _stat_dtype(compute_dtype)
        stats = reference_linear_token_stats(
            hidden.to(compute_dtype), weight.to(compute_dtype), targets,
            bias=None if bias is None else bias.to(compute_dtype),
            temperature=temperature, ignore_index=ignore_index, dtype=sdt,
        )  # fmt: skip
        rows = torch.nonzero(targets != ignore_index).squeeze(1)
        loss = torch.zeros((), dtype=sdt, device=hidden.device)
        if rows.numel():
            per_token = loss_fn(stats.logprobs[rows], stats.entropy[rows], rows)
            if not isinstance(per_token, torch.Tensor) or tuple(per_token.shape) != (rows.numel(),):
                raise ValueError(f"loss_fn: must return a per-token tensor of shape [{rows.numel()}]")
            loss = loss + per_token.sum()
        return loss, TokenStats(stats.logprobs.detach(), stats.entropy.detach())

    tc = token_chunk or token_chunk_for_budget(weight.shape[0], compute_dtype, chunk_budget_bytes)
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and x is not None and x.requires_grad) for x in (hidden, weight, bias))
    cfg = (float(temperature), int(ignore_index), compute_dtype, tc, need, backend == "triton")
    loss, lp, ent = _FusedLinearLoss.apply(hidden, weight, bias, targets.reshape(-1), loss_fn, cfg)
    return loss, TokenStats(lp, ent)


def ppo_clip_token_loss(
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor = 1.0,
) -> LossFn:
    """``loss_fn`` for :func:`fused_linear_loss`: PPO clipped surrogate with a token-level entropy bonus.

    With ``rho_t = exp(lp_t - old_lp_t)`` (log-ratio clamped to ``[-20, 20]``, as in
    :func:`llm_entreg.rl.ppo_policy_loss`)::

        L_t = mask_t * ( max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_low, 1 + clip_high))
                         - entropy_coef * H_t ) / normalizer

    i.e. ``-min(rho A, clip(rho) A) - beta H``. ``old_logprobs``, ``advantages``, ``mask`` are ``[N]``, aligned with
    the flattened ``hidden`` rows (detached here). ``mask`` may be a float weight: ``token-mean`` is a 0/1 mask with
    ``normalizer`` = the (global) token count; ``seq-mean-token-mean`` is ``mask = 1 / len(sequence)`` with
    ``normalizer`` = the (global) sequence count. Masked-out tokens (``mask == 0``) contribute exactly 0 even where
    their constants hold NaN/inf padding.
    """
    from ..rl.ppo import check_clip_range, clipped_surrogate

    check_clip_range(clip_low, clip_high)
    shape = tuple(old_logprobs.shape)
    for name, t in (("advantages", advantages), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match old_logprobs {shape}")
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach()
        if bool((normalizer <= 0).any()):
            raise ValueError("normalizer: must be > 0")
    elif not normalizer > 0:
        raise ValueError(f"normalizer: must be > 0, got {normalizer}")
    old_flat = old_logprobs.detach().reshape(-1)
    adv_flat = advantages.detach().reshape(-1)
    mask_flat = mask.detach().reshape(-1)

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dt = logprobs.dtype
        weight = mask_flat[rows].to(dt)
        on = weight != 0
        zero = torch.zeros((), dtype=dt, device=logprobs.device)
        old = torch.where(on, old_flat[rows].to(dt), zero)
        adv = torch.where(on, adv_flat[rows].to(dt), zero)
        lp = torch.where(on, logprobs, zero)
        surrogate, _ = clipped_surrogate(lp, old, adv, clip_low, clip_high)
        per_token = surrogate - entropy_coef * torch.where(on, entropy, zero)
        return per_token * weight / normalizer

    return loss_fn
