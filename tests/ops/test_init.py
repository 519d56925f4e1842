"""The public ops (``llm_entreg.ops``) on the ``torch`` and ``chunked`` backends against a float64 reference, forward
and backward, and their input checks (CPU)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from llm_entreg.ops import (
    linear_logprob_and_entropy,
    linear_token_stats,
    logprob_and_entropy,
    token_stats,
)
from llm_entreg.ops import chunked as chunked_mod
from llm_entreg.ops.reference import reference_linear_token_stats, reference_token_stats

from .helpers import EXTRAS, grads_of, make_targets, tolerance


BACKENDS = ["torch", "chunked"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(3))
def test_logits_op_matches_float64_reference(backend, dtype, case):
    seed = 1000 * case + (7 if dtype == torch.bfloat16 else 3) + (0 if backend == "torch" else 50)
    gen = torch.Generator().manual_seed(seed)
    shape = [(3, 11), (17,), (2, 3, 5)][case]
    n_vocab = [301, 97, 1031][case]
    temperature = [1.0, 0.7, 1.9][case]
    logits = (torch.randn(*shape, n_vocab, generator=gen) * 3).to(dtype)
    if case == 1:  # masked vocabulary: whole -inf columns
        logits[..., 10:40] = float("-inf")
        logits[..., 90:] = float("-inf")
    targets = make_targets(gen, shape, n_vocab if case != 1 else 90, low=40 if case == 1 else 0)
    logits.requires_grad_(True)
    stats = token_stats(logits, targets, temperature=temperature, backend=backend, extras=EXTRAS)
    assert stats.logprobs.dtype == torch.float32 and stats.entropy.dtype == torch.float32
    assert stats.logprobs.shape == targets.shape

    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, temperature=temperature, dtype=torch.float64, extras=EXTRAS)
    tol = tolerance(dtype)
    torch.testing.assert_close(stats.logprobs.double(), ref.logprobs.detach(), **tol)
    torch.testing.assert_close(stats.entropy.double(), ref.entropy.detach(), **tol)
    torch.testing.assert_close(stats.log_sum_sq_probs.double(), ref.log_sum_sq_probs, **tol)
    if case != 1:  # the mean over a vocabulary with -inf entries is -inf for both
        torch.testing.assert_close(stats.mean_logits.double(), ref.mean_logits, **tol)
    if dtype == torch.float32:
        assert torch.equal(stats.is_top1, ref.is_top1)

    g_lp = torch.randn(shape, generator=gen)
    g_h = torch.randn(shape, generator=gen)
    (grad,) = grads_of(stats.logprobs, stats.entropy, [logits], g_lp, g_h)
    (ref_grad,) = grads_of(ref.logprobs, ref.entropy, [ref_in], g_lp.double(), g_h.double())
    assert grad.dtype == logits.dtype
    assert not torch.isnan(grad).any()
    torch.testing.assert_close(grad.double(), ref_grad, **tol)
    ignored = targets == -100
    assert (grad[ignored] == 0).all()
    assert (stats.logprobs[ignored] == 0).all() and (stats.entropy[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_op_matches_float64_reference(backend, dtype, with_bias):
    seed = 31 + 2 * int(with_bias) + (5 if dtype == torch.bfloat16 else 0) + (0 if backend == "torch" else 100)
    gen = torch.Generator().manual_seed(seed)
    n, d, n_vocab, temperature = 45, 19, 523, 0.8
    hidden = (torch.randn(n, d, generator=gen)).to(dtype).requires_grad_(True)
    weight = (torch.randn(n_vocab, d, generator=gen) / math.sqrt(d) * 2).to(dtype).requires_grad_(True)
    bias = (torch.randn(n_vocab, generator=gen)).to(dtype).requires_grad_(True) if with_bias else None
    targets = make_targets(gen, (n,), n_vocab)
    stats = linear_token_stats(hidden, weight, targets, bias=bias, temperature=temperature, backend=backend, extras=EXTRAS)

    leaves = [hidden, weight] + ([bias] if with_bias else [])
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = reference_linear_token_stats(
        ref_leaves[0], ref_leaves[1], targets, bias=ref_leaves[2] if with_bias else None,
        temperature=temperature, dtype=torch.float64, extras=EXTRAS,
    )
    tol = tolerance(dtype)
    torch.testing.assert_close(stats.logprobs.double(), ref.logprobs.detach(), **tol)
    torch.testing.assert_close(stats.entropy.double(), ref.entropy.detach(), **tol)
    torch.testing.assert_close(stats.mean_logits.double(), ref.mean_logits, **tol)
    torch.testing.assert_close(stats.log_sum_sq_probs.double(), ref.log_sum_sq_probs, **tol)
    if dtype == torch.float32:
        assert torch.equal(stats.is_top1, ref.is_top1)
    else:  # bf16 operands, but fp32 logits (not rounded to bf16): the statistics are fp32-accurate
        for got, exp in ((stats.logprobs, ref.logprobs), (stats.entropy, ref.entropy)):
            assert (got.double() - exp.detach()).abs().max() < 1e-4

    g_lp, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    grads = grads_of(stats.logprobs, stats.entropy, leaves, g_lp, g_h)
    ref_grads = grads_of(ref.logprobs, ref.entropy, ref_leaves, g_lp.double(), g_h.double())
    for g, rg, x in zip(grads, ref_grads, leaves):
        assert g.dtype == x.dtype
        scale = rg.abs().max().item() + 1.0
        torch.testing.assert_close(g.double() / scale, rg / scale, **tol)
    assert (grads[0][targets == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_for_logging_only_gets_no_backward_work(backend, monkeypatch):
    """Only the log-probs get a gradient: the result equals the log-prob-only gradient, and (chunked) the backward
    never forms an entropy term."""
    gen = torch.Generator().manual_seed(77)
    hidden = torch.randn(23, 11, generator=gen, requires_grad=True)
    weight = torch.randn(151, 11, generator=gen, requires_grad=True)
    targets = make_targets(gen, (23,), 151)
    seen = []
    original = chunked_mod.grad_tile

    def spy(z, local, lse, ent, g_lp, g_h, *args):
        seen.append(g_h)
        return original(z, local, lse, ent, g_lp, g_h, *args)

    monkeypatch.setattr(chunked_mod, "grad_tile", spy)
    lp, ent = linear_logprob_and_entropy(hidden, weight, targets, backend=backend)
    g = torch.randn(23, generator=gen)
    gh, gw = torch.autograd.grad((lp * g).sum(), [hidden, weight])
    ref_h = hidden.detach().double().requires_grad_(True)
    ref_w = weight.detach().double().requires_grad_(True)
    ref = reference_linear_token_stats(ref_h, ref_w, targets, dtype=torch.float64)
    rh, rw = torch.autograd.grad((ref.logprobs * g.double()).sum(), [ref_h, ref_w])
    torch.testing.assert_close(gh.double(), rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw, atol=1e-5, rtol=1e-5)
    if backend == "chunked":
        assert seen and all(x is None for x in seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_extreme_logits_give_no_nan(backend):
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(50, 4, requires_grad=True)
    targets = torch.full((6,), -100)
    lp, ent = linear_logprob_and_entropy(hidden, weight, targets, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight])
    assert (gh == 0).all() and (gw == 0).all()

    # |z| up to 1e4: a near-one-hot distribution, entropy ~ 0, no NaN/inf anywhere.
    gen = torch.Generator().manual_seed(3)
    logits = (torch.rand(4, 9, 37, generator=gen) * 2 - 1) * 1e4
    logits.requires_grad_(True)
    targets = torch.randint(0, 37, (4, 9), generator=gen)
    lp, ent = logprob_and_entropy(logits, targets, backend=backend)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, dtype=torch.float64)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double(), ref.logprobs.detach(), atol=1e-2, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ref.entropy.detach(), atol=1e-3, rtol=0)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), [logits])
    (rg,) = torch.autograd.grad(ref.logprobs.sum() + ref.entropy.sum(), [ref_in])
    assert torch.isfinite(g).all()
    # fp32 spacing at |z| ~ 1e4 is ~1e-3: that bounds what any fp32 implementation can reach here
    torch.testing.assert_close(g.double(), rg, atol=3e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 5), targets=torch.zeros(4, dtype=torch.long)), "weight"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(5, dtype=torch.long)), "targets"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.tensor([0, 1, 10, 2])), "targets"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.tensor([0, -5, 1, 2])), "targets"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(4)), "targets"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3, dtype=torch.float64), targets=torch.zeros(4, dtype=torch.long)), "weight"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(4, dtype=torch.long), bias=torch.randn(9)), "bias"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(4, dtype=torch.long), temperature=0.0), "temperature"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(4, dtype=torch.long), backend="cuda"), "backend"),
        (dict(hidden=torch.randn(12), weight=torch.randn(10, 3), targets=torch.zeros(4, dtype=torch.long)), "hidden"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(10, 3), targets=torch.zeros(4, dtype=torch.long), ignore_index=3), "ignore_index"),
    ],
)
def test_linear_bad_input_names_the_argument(kwargs, name):
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        linear_logprob_and_entropy(hidden, weight, targets, **kwargs)


def test_logits_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"^targets\b"):
        logprob_and_entropy(torch.randn(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^logits\b"):
        logprob_and_entropy(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^targets\b"):
        logprob_and_entropy(torch.randn(2, 7), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"^extras\b"):
        token_stats(torch.randn(2, 7), torch.tensor([0, 1]), extras=("entropy_of_everything",))


# ---------------------------------------------------------------- precision under autocast, and torch.compile

def _runnable_backends():
    names = ["torch", "chunked"]
    from .triton_helpers import RUNNABLE  # imports triton only when the interpreter (or CUDA) runs the kernels

    return names + (["triton"] if RUNNABLE else [])


PRECISION_BACKENDS = _runnable_backends()
AUTOCAST = [None, torch.bfloat16, torch.float16]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _assert_matches_reference(stats, ref, leaves, ref_leaves, gen, what, compute=torch.float32):
    """Forward (log-prob, entropy, the DPO extras) within fp32 tolerance of float64; backward within the precision
    of the gradients' dtype (half-precision GEMM operands in the linear backward)."""
    names = ("logprobs", "entropy", "log_sum_sq_probs") + (("mean_logits",) if torch.isfinite(ref.mean_logits).all()
                                                          else ())  # the mean over -inf columns is -inf for both
    for name in names:
        got, exp = getattr(stats, name), getattr(ref, name).detach()
        assert got.dtype == torch.float32, f"{what} {name}: {got.dtype}"
        assert torch.isfinite(got).all(), f"{what} {name}: not finite"
        torch.testing.assert_close(got.double(), exp, atol=3e-5, rtol=3e-5, msg=lambda m: f"{what} {name}: {m}")
    assert torch.equal(stats.is_top1, ref.is_top1), what
    g_lp = torch.randn(stats.logprobs.shape, generator=gen)
    g_h = torch.randn(stats.logprobs.shape, generator=gen)
    grads = grads_of(stats.logprobs, stats.entropy, leaves, g_lp, g_h)
    ref_grads = grads_of(ref.logprobs, ref.entropy, ref_leaves, g_lp.double(), g_h.double())
    for g, rg, x in zip(grads, ref_grads, leaves):
        assert g.dtype == x.dtype and torch.isfinite(g).all(), what
        scale = rg.abs().max().item() + 1e-12
        atol = 2e-5 if x.dtype == compute == torch.float32 else 2e-2
        torch.testing.assert_close(g.double() / scale, rg / scale, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("neg_inf", [False, True])
def test_logits_op_is_exact_under_autocast(backend, dtype, autocast, neg_inf):
    """The logits op computes in fp32 whatever the caller's autocast: the statistics match float64 of the given logits."""
    gen = torch.Generator().manual_seed(11 + 3 * INPUT_DTYPES.index(dtype) + AUTOCAST.index(autocast))
    logits = (torch.randn(13, 97, generator=gen) * 4).to(dtype)
    if neg_inf:
        logits[:, 5:30] = float("-inf")
    targets = make_targets(gen, (13,), 97, low=30 if neg_inf else 0)
    logits.requires_grad_(True)
    with _autocast(autocast):
        stats = token_stats(logits, targets, temperature=0.9, backend=backend, extras=EXTRAS)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, temperature=0.9, dtype=torch.float64, extras=EXTRAS)
    _assert_matches_reference(stats, ref, [logits], [ref_in], gen, f"{backend} {dtype} autocast={autocast}", dtype)


@pytest.mark.parametrize("backend", PRECISION_BACKENDS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("neg_inf", [False, True])
def test_linear_op_keeps_fp32_logits_under_autocast(backend, dtype, autocast, neg_inf):
    """The head's GEMM takes operands in the compute dtype (autocast's, else the inputs') and accumulates fp32 logits:
    the statistics match float64 of those operands, on every backend (none rounds the logits to bf16/fp16)."""
    gen = torch.Generator().manual_seed(101 + 3 * INPUT_DTYPES.index(dtype) + AUTOCAST.index(autocast))
    n, d, n_vocab = 11, 64, 97
    hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(n_vocab, d, generator=gen) * 0.5).to(dtype).requires_grad_(True)
    bias = torch.zeros(n_vocab, dtype=dtype)
    if neg_inf:
        bias[5:30] = float("-inf")
    targets = make_targets(gen, (n,), n_vocab, low=30 if neg_inf else 0)
    with _autocast(autocast):
        stats = linear_token_stats(hidden, weight, targets, bias=bias, backend=backend, extras=EXTRAS)
    compute = autocast or dtype
    ref_leaves = [x.detach().to(compute).double().requires_grad_(True) for x in (hidden, weight)]
    ref = reference_linear_token_stats(ref_leaves[0], ref_leaves[1], targets, bias=bias.to(compute).double(),
                                       dtype=torch.float64, extras=EXTRAS)
    _assert_matches_reference(stats, ref, [hidden, weight], ref_leaves, gen, f"{backend} {dtype} autocast={autocast}",
                              compute)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_compiled_fullgraph_ops_equal_eager_forward_and_backward(backend):
    """``torch.compile(fullgraph=True)`` traces both ops (no branch on tensor data, no data-dependent shapes) and gives
    the eager results, with ignored positions, ``-inf`` logits and a bias; bad targets still fail inside the graph."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(37, 301, generator=gen) * 3)
    logits[:, :20] = float("-inf")
    targets = make_targets(gen, (37,), 301, low=20)
    hidden = torch.randn(37, 24, generator=gen)
    weight = torch.randn(301, 24, generator=gen)
    bias = torch.randn(301, generator=gen)
    bias[:20] = float("-inf")

    def logits_op(z, t):
        return logprob_and_entropy(z, t, temperature=0.8, backend=backend)

    def linear_op(h, w, b, t):
        return linear_logprob_and_entropy(h, w, t, bias=b, temperature=0.8, backend=backend)

    for op, inputs in ((logits_op, [logits]), (linear_op, [hidden, weight, bias])):
        results = []
        for fn in (op, torch.compile(op, fullgraph=True, backend="aot_eager")):
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            lp, h = fn(*leaves, targets)
            grads = torch.autograd.grad((lp * 1.3 + h * 0.7).sum(), leaves)
            results.append((lp, h, *grads))
        for i, (eager, compiled) in enumerate(zip(*results)):
            # forward bitwise; gradients up to the order of fp32 sums (the compiled path sums over ignored rows' zeros)
            tol = dict(atol=0, rtol=0) if i < 2 else dict(atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(compiled, eager, **tol)
    compiled = torch.compile(logits_op, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="targets: a value is outside"):
        compiled(logits, torch.full((37,), 301))


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager():
    """The default compiler (inductor, generated C++ on the CPU) on the chunked head: eager results within fp32."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(29, 16, generator=gen, requires_grad=True)
    weight = torch.randn(151, 16, generator=gen, requires_grad=True)
    targets = make_targets(gen, (29,), 151)

    def op(h, w, t):
        return linear_logprob_and_entropy(h, w, t, backend="chunked")

    out = []
    for fn in (op, torch.compile(op, fullgraph=True)):
        lp, h = fn(hidden, weight, targets)
        out.append((lp, h, *torch.autograd.grad((lp - 0.5 * h).sum(), [hidden, weight])))
    for eager, compiled in zip(*out):
        torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=2e-5)
