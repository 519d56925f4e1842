"""The loss-fused LM head (``ops/fused_loss.py``) against autograd through the float64 reference + the same loss_fn."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.losses import ppo_clip_token_loss, reference_ppo_policy_loss
from llm_entreg.ops import fused_linear_loss, linear_token_stats
from llm_entreg.ops import fused_loss as fused_mod
from llm_entreg.ops.reference import reference_linear_token_stats

N, D, V = 37, 19, 301


def _problem(seed, dtype=torch.float64, with_bias=True, neg_inf_bias=True, ignore_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=gen) * 2 / math.sqrt(D)).to(dtype).requires_grad_(True)
    bias = None
    targets = torch.randint(0, V, (N,), generator=gen)
    if with_bias:
        b = torch.randn(V, generator=gen)
        if neg_inf_bias:
            b[::7] = float("-inf")  # masked vocabulary through the bias
            targets = torch.where(torch.isinf(b[targets]), targets + 1, targets)
        bias = b.to(dtype).requires_grad_(True)
    targets = targets.masked_fill(torch.rand(N, generator=gen) < ignore_frac, -100)
    return gen, hidden, weight, bias, targets


def _leaves(hidden, weight, bias):
    return [hidden, weight] + ([bias] if bias is not None else [])


def _reference(hidden, weight, bias, targets, loss_fn, temperature):
    """Loss and grads by plain autograd through the float64 reference (ignored tokens dropped before loss_fn)."""
    leaves = [x.detach().double().requires_grad_(True) for x in _leaves(hidden, weight, bias)]
    stats = reference_linear_token_stats(
        leaves[0], leaves[1], targets, bias=leaves[2] if bias is not None else None,
        temperature=temperature, dtype=torch.float64,
    )  # fmt: skip
    rows = torch.nonzero(targets != -100).squeeze(1)
    loss = loss_fn(stats.logprobs[rows], stats.entropy[rows], rows).sum()
    return loss.detach(), torch.autograd.grad(loss, leaves), stats


def _generic_loss_fn(gen):
    """A nonlinear function of (lp, H) with per-token constants read through ``rows``."""
    c1 = torch.randn(N, generator=gen, dtype=torch.float64)
    c2 = torch.randn(N, generator=gen, dtype=torch.float64)

    def loss_fn(lp, ent, rows):
        return c1[rows].to(lp.dtype) * lp + 0.3 * torch.sin(ent) * c2[rows].to(lp.dtype) + 0.1 * lp * ent

    return loss_fn


def _assert_grads(grads, ref_grads, leaves, **tol):
    for g, rg, x in zip(grads, ref_grads, leaves):
        assert g is not None and g.dtype == x.dtype and g.shape == x.shape
        assert not torch.isnan(g).any()
        scale = rg.abs().max().item() + 1.0
        torch.testing.assert_close(g.double() / scale, rg / scale, **tol)


F64_TOL = dict(atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("token_chunk", [None, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_generic_loss_matches_float64_reference(token_chunk, with_bias):
    gen, hidden, weight, bias, targets = _problem(10 + int(with_bias) + (0 if token_chunk is None else 2),
                                                  with_bias=with_bias)  # fmt: skip
    loss_fn = _generic_loss_fn(gen)
    temperature = 0.7
    loss, stats = fused_linear_loss(
        hidden, weight, targets, loss_fn, bias=bias, temperature=temperature, token_chunk=token_chunk
    )
    ref_loss, ref_grads, ref_stats = _reference(hidden, weight, bias, targets, loss_fn, temperature)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **F64_TOL)
    torch.testing.assert_close(stats.logprobs, ref_stats.logprobs.detach(), **F64_TOL)
    torch.testing.assert_close(stats.entropy, ref_stats.entropy.detach(), **F64_TOL)
    assert not stats.logprobs.requires_grad and not stats.entropy.requires_grad
    leaves = _leaves(hidden, weight, bias)
    grads = torch.autograd.grad(loss, leaves)
    _assert_grads(grads, ref_grads, leaves, **F64_TOL)
    assert (grads[0][targets == -100] == 0).all()
    if with_bias:  # masked vocabulary entries get exactly zero gradient
        assert (grads[2][torch.isinf(bias.detach())] == 0).all()
        assert (grads[1][torch.isinf(bias.detach())] == 0).all()


def test_several_chunks_from_the_memory_budget():
    """A budget of 6 fp64 rows of V gives 6-token chunks: loss_fn sees each valid token exactly once."""
    gen, hidden, weight, bias, targets = _problem(21)
    inner = _generic_loss_fn(gen)
    seen = []

    def loss_fn(lp, ent, rows):
        seen.append(rows.clone())
        return inner(lp, ent, rows)

    assert fused_mod.token_chunk_for_budget(V, torch.float64, 6 * V * 8) == 6
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=1.6,
                                chunk_budget_bytes=6 * V * 8)  # fmt: skip
    valid = torch.nonzero(targets != -100).squeeze(1)
    assert len(seen) == math.ceil(valid.numel() / 6) and max(len(r) for r in seen) == 6
    assert torch.equal(torch.cat(seen), valid)
    ref_loss, ref_grads, _ = _reference(hidden, weight, bias, targets, inner, 1.6)
    torch.testing.assert_close(loss, ref_loss, **F64_TOL)
    leaves = _leaves(hidden, weight, bias)
    _assert_grads(torch.autograd.grad(loss, leaves), ref_grads, leaves, **F64_TOL)


def _ppo_setup(gen, targets, hidden, weight, bias, temperature):
    with torch.no_grad():
        ref = reference_linear_token_stats(hidden.double(), weight.double(), targets,
                                           bias=None if bias is None else bias.double(),
                                           temperature=temperature, dtype=torch.float64)  # fmt: skip
    # Old log-probs far enough from the current ones that the ratio leaves [0.8, 1.2] on many tokens.
    old = ref.logprobs + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64)
    old[targets == -100] = float("nan")  # padding garbage must not leak
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    mask = (torch.rand(N, generator=gen) > 0.15) & (targets != -100)
    ratio = torch.exp(ref.logprobs - old)
    clipped = mask & (((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8)))
    return old, adv, mask, clipped


@pytest.mark.parametrize("token_chunk", [None, 4])
def test_ppo_clip_adapter_with_active_clipping(token_chunk):
    gen, hidden, weight, bias, targets = _problem(31 + (token_chunk or 0))
    temperature = 1.3
    old, adv, mask, clipped = _ppo_setup(gen, targets, hidden, weight, bias, temperature)
    assert clipped.sum() >= 3 and (mask & ~clipped).sum() >= 3  # both regimes are exercised
    loss_fn = ppo_clip_token_loss(old, adv, mask, clip_low=0.2, clip_high=0.2, entropy_coef=0.05,
                                  normalizer=mask.sum())  # fmt: skip
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=temperature,
                                token_chunk=token_chunk)  # fmt: skip
    ref_loss, ref_grads, _ = _reference(hidden, weight, bias, targets, loss_fn, temperature)
    torch.testing.assert_close(loss, ref_loss, **F64_TOL)
    leaves = _leaves(hidden, weight, bias)
    grads = torch.autograd.grad(loss, leaves)
    _assert_grads(grads, ref_grads, leaves, **F64_TOL)
    # Masked-out tokens get no gradient; clipped tokens keep only the entropy term's gradient.
    assert (grads[0][~mask] == 0).all()


def test_ppo_adapter_agrees_with_the_reference_ppo_policy_loss():
    """With entropy_coef = 0 and normalizer = token count, the adapter is ``reference_ppo_policy_loss`` (token-mean)."""

    gen = torch.Generator().manual_seed(5)
    lp = -torch.rand(1, 40, generator=gen, dtype=torch.float64) * 3
    old = lp + 0.4 * torch.randn(1, 40, generator=gen, dtype=torch.float64)
    adv = torch.randn(1, 40, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 40, generator=gen) > 0.2
    expected, _ = reference_ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    fn = ppo_clip_token_loss(old, adv, mask, clip_low=0.2, clip_high=0.28, normalizer=mask.sum())
    rows = torch.arange(40)
    got = fn(lp.reshape(-1), torch.rand(40, dtype=torch.float64), rows).sum()
    torch.testing.assert_close(got, expected)


def test_bf16_inputs_loose_tolerance():
    gen, hidden, weight, bias, targets = _problem(41, dtype=torch.bfloat16)
    loss_fn = ppo_clip_token_loss(torch.zeros(N), torch.randn(N, generator=gen), targets != -100,
                                  entropy_coef=0.1, normalizer=float((targets != -100).sum()))  # fmt: skip
    loss, stats = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=0.9, token_chunk=8)
    assert loss.dtype == torch.float32 and stats.logprobs.dtype == torch.float32
    ref_loss, ref_grads, _ = _reference(hidden, weight, bias, targets, loss_fn, 0.9)
    torch.testing.assert_close(loss.double(), ref_loss, atol=5e-2, rtol=2e-2)
    leaves = _leaves(hidden, weight, bias)
    _assert_grads(torch.autograd.grad(loss, leaves), ref_grads, leaves, atol=5e-2, rtol=2e-2)


def test_float32_matches_recomputing_chunked_path():
    """Same loss and grads as autograd through the 8NdV chunked fused head + loss_fn, in float32."""
    gen, hidden, weight, bias, targets = _problem(51, dtype=torch.float32)
    loss_fn = _generic_loss_fn(gen)
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=1.2, token_chunk=7)
    leaves = _leaves(hidden, weight, bias)
    grads = torch.autograd.grad(loss, leaves)
    st = linear_token_stats(hidden, weight, targets, bias=bias, temperature=1.2, backend="chunked")
    rows = torch.nonzero(targets != -100).squeeze(1)
    other = loss_fn(st.logprobs[rows], st.entropy[rows], rows).sum()
    torch.testing.assert_close(loss, other.float(), atol=1e-5, rtol=1e-5)
    for g, og in zip(grads, torch.autograd.grad(other, leaves)):
        torch.testing.assert_close(g, og, atol=1e-5, rtol=1e-5)


def test_torch_backend_is_the_reference_path():
    gen, hidden, weight, bias, targets = _problem(61)
    loss_fn = _generic_loss_fn(gen)
    a, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=0.8, backend="chunked")
    b, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, temperature=0.8, backend="torch")
    torch.testing.assert_close(a, b, **F64_TOL)
    leaves = _leaves(hidden, weight, bias)
    _assert_grads(torch.autograd.grad(a, leaves), torch.autograd.grad(b, leaves), leaves, **F64_TOL)


def test_gemm_count_and_backward_only_scales(monkeypatch):
    """6NdV: per chunk one logits GEMM and two gradient GEMMs, all in forward; backward scales, recomputes nothing.
    A frozen weight drops its GEMM (4NdV); no grad at all leaves the logits GEMM only (2NdV)."""
    gen, hidden, weight, bias, targets = _problem(71, ignore_frac=0.0)
    loss_fn = _generic_loss_fn(gen)
    calls = {"logits": 0, "grad": 0}
    real_logits, real_acc = fused_mod._logits_into, fused_mod._acc_mm

    def count_logits(*a):
        calls["logits"] += 1
        return real_logits(*a)

    def count_acc(*a):
        calls["grad"] += 1
        return real_acc(*a)

    monkeypatch.setattr(fused_mod, "_logits_into", count_logits)
    monkeypatch.setattr(fused_mod, "_acc_mm", count_acc)
    n_chunks = math.ceil(N / 10)
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, token_chunk=10)
    assert calls == {"logits": n_chunks, "grad": 2 * n_chunks}
    leaves = _leaves(hidden, weight, bias)
    g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    g3 = torch.autograd.grad(3.0 * loss, leaves)  # a retained graph runs backward again; the scale applies
    assert calls == {"logits": n_chunks, "grad": 2 * n_chunks}
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b)

    calls.update(logits=0, grad=0)
    frozen = weight.detach()
    loss_f, _ = fused_linear_loss(hidden, frozen, targets, loss_fn, bias=bias, token_chunk=10)
    assert calls == {"logits": n_chunks, "grad": n_chunks}
    (gh,) = torch.autograd.grad(loss_f, [hidden])
    torch.testing.assert_close(gh, g1[0], **F64_TOL)

    calls.update(logits=0, grad=0)
    with torch.no_grad():
        loss_n, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, token_chunk=10)
    assert calls == {"logits": n_chunks, "grad": 0}
    torch.testing.assert_close(loss_n, loss.detach(), **F64_TOL)


def test_all_ignored_batch_gives_zero_loss_and_grads():
    _, hidden, weight, bias, _ = _problem(81)
    targets = torch.full((N,), -100)
    called = []
    loss, stats = fused_linear_loss(hidden, weight, targets, lambda lp, h, r: called.append(1) or lp, bias=bias)
    assert not called and loss.item() == 0.0
    assert (stats.logprobs == 0).all() and (stats.entropy == 0).all()
    grads = torch.autograd.grad(loss, _leaves(hidden, weight, bias))
    for g in grads:
        assert not torch.isnan(g).any() and (g == 0).all()


def test_entropy_only_and_logprob_only_losses():
    """loss_fn may depend on only one statistic (the other upstream gradient is None)."""
    gen, hidden, weight, bias, targets = _problem(91)
    leaves = _leaves(hidden, weight, bias)
    for fn in (lambda lp, h, r: -0.2 * h, lambda lp, h, r: -lp):
        loss, _ = fused_linear_loss(hidden, weight, targets, fn, bias=bias, temperature=1.1, token_chunk=9)
        ref_loss, ref_grads, _ = _reference(hidden, weight, bias, targets, fn, 1.1)
        torch.testing.assert_close(loss, ref_loss, **F64_TOL)
        _assert_grads(torch.autograd.grad(loss, leaves), ref_grads, leaves, **F64_TOL)
    # A loss that does not depend on the statistics at all: value 0, zero gradients, no GEMM for them.
    loss, _ = fused_linear_loss(hidden, weight, targets, lambda lp, h, r: torch.zeros_like(lp), bias=bias)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(loss, leaves))


def test_bad_arguments_raise():
    _, hidden, weight, bias, targets = _problem(101)
    ok = lambda lp, h, r: lp  # noqa: E731
    with pytest.raises(ValueError, match="backend"):
        fused_linear_loss(hidden, weight, targets, ok, backend="triton")
    with pytest.raises(ValueError, match="loss_fn"):
        fused_linear_loss(hidden, weight, targets, lambda lp, h, r: lp.sum())
    with pytest.raises(ValueError, match="loss_fn"):
        fused_linear_loss(hidden, weight, targets, "not callable")
    with pytest.raises(ValueError, match="token_chunk"):
        fused_linear_loss(hidden, weight, targets, ok, token_chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_loss(hidden, weight, targets, ok, temperature=0.0)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_chunk", [None, 6])
def test_triton_backend_matches_float64_reference(dtype, token_chunk):
    """backend="triton": the chunk's statistics and dz from the row kernels (interpreter on the CPU)."""
    pytest.importorskip("triton")
    gen, hidden, weight, bias, targets = _problem(31 + (dtype == torch.bfloat16) + 2 * (token_chunk is None),
                                                  dtype=dtype)  # fmt: skip
    loss_fn = _generic_loss_fn(gen)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA: the kernels under the interpreter
    on_dev = [x.detach().to(dev).requires_grad_(True) for x in (hidden, weight, bias)]

    def dev_loss_fn(lp, ent, rows):
        return loss_fn(lp.cpu(), ent.cpu(), rows.cpu()).to(lp.device)

    loss, stats = fused_linear_loss(on_dev[0], on_dev[1], targets.to(dev), dev_loss_fn, bias=on_dev[2],
                                    temperature=0.8, token_chunk=token_chunk, backend="triton")  # fmt: skip
    stats = type(stats)(stats.logprobs.cpu(), stats.entropy.cpu())
    # the reference on the inputs as the kernels see them (already in dtype), computed in float64
    ref_loss, ref_grads, ref_stats = _reference(hidden, weight, bias, targets, loss_fn, 0.8)
    assert loss.dtype == torch.float32
    tight = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(stats.logprobs.double(), ref_stats.logprobs.detach(), **tight)
    torch.testing.assert_close(stats.entropy.double(), ref_stats.entropy.detach(), **tight)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-4, rtol=1e-5)
    loss = loss.cpu()
    leaves = _leaves(hidden, weight, bias)
    grads = [g.cpu() for g in torch.autograd.grad(loss, on_dev)]
    if dtype == torch.float32 and dev == "cpu":
        _assert_grads(grads, ref_grads, leaves, atol=2e-6, rtol=1e-5)
    elif dtype == torch.float32:  # TF32 GEMMs on the GPU
        _assert_grads(grads, ref_grads, leaves, atol=2e-3, rtol=2e-3)
    else:  # dz rounded to bf16 for the GEMMs, gradients returned in bf16
        for g, rg in zip(grads, ref_grads):
            assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
            rel = (g.double() - rg).norm() / rg.norm()
            assert rel < 1e-2, f"relative error {rel:.3g}"
    assert (grads[0][targets == -100] == 0).all()
    assert (grads[2][torch.isinf(bias.detach())] == 0).all()


def test_triton_backend_refuses_float64_and_auto_is_chunked_on_cpu():
    gen, hidden, weight, bias, targets = _problem(41)
    loss_fn = _generic_loss_fn(gen)
    with pytest.raises(ValueError, match="float64"):
        fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="triton")
    a, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="auto")
    b, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="chunked")
    assert a.item() == b.item()


def _group_loss_fn(groups):
    """A loss that needs every token of a group at once: (Σ_group lp)² / 10 + H, spread back over the tokens."""

    def loss_fn(lp, ent, rows):
        g = groups[rows]
        present, inverse = torch.unique(g, return_inverse=True)
        sums = torch.zeros(present.numel(), dtype=lp.dtype).index_add(0, inverse, lp)
        counts = torch.zeros(present.numel(), dtype=lp.dtype).index_add(0, inverse, torch.ones_like(lp))
        return (sums**2 / 10)[inverse] / counts[inverse] + 0.2 * ent

    return loss_fn


def test_groups_keep_every_token_of_a_group_in_one_chunk():
    gen, hidden, weight, bias, targets = _problem(11)
    groups = torch.randint(0, 6, (N,), generator=gen)  # interleaved groups: a plain split would cut them
    loss_fn = _group_loss_fn(groups)
    ref_loss, ref_grads, _ = _reference(hidden, weight, bias, targets, loss_fn, 1.0)
    seen = []

    def spy(lp, ent, rows):
        seen.append(set(groups[rows].tolist()))
        return loss_fn(lp, ent, rows)

    loss, _ = fused_linear_loss(hidden, weight, targets, spy, bias=bias, backend="chunked", token_chunk=8,
                                groups=groups)
    grads = torch.autograd.grad(loss, _leaves(hidden, weight, bias))
    torch.testing.assert_close(loss.double(), ref_loss, **F64_TOL)
    _assert_grads(grads, ref_grads, _leaves(hidden, weight, bias), **F64_TOL)
    assert len(seen) > 1 and all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])  # groups never split
    with pytest.raises(ValueError, match="groups: expected one group id per position"):
        fused_linear_loss(hidden, weight, targets, loss_fn, groups=groups[:-1], backend="chunked")


def test_extras_come_from_the_stored_chunks():
    _, hidden, weight, bias, targets = _problem(12)
    _, stats = fused_linear_loss(hidden, weight, targets, lambda lp, ent, rows: lp, bias=bias, backend="chunked",
                                 token_chunk=5, temperature=1.3, extras=("mean_logits", "is_top1"))
    ref = linear_token_stats(hidden.detach(), weight.detach(), targets, bias=bias.detach(), temperature=1.3,
                             backend="torch", extras=("mean_logits", "is_top1"))
    valid = targets != -100
    torch.testing.assert_close(stats.mean_logits[valid].double(), ref.mean_logits[valid].double(), atol=1e-9,
                               rtol=1e-9)
    assert torch.equal(stats.is_top1[valid], ref.is_top1[valid])


@pytest.mark.interpret
def test_triton_extras_come_from_the_row_kernel():
    """backend="triton": mean_logits / is_top1 from the row kernel's read pass equal the materialized reference."""
    pytest.importorskip("triton")
    _, hidden, weight, bias, targets = _problem(14, dtype=torch.float32)
    top = (hidden @ weight.t() + bias).argmax(1)  # every other labelled row's target is its top token
    targets = torch.where((torch.arange(N) % 2 == 0) & (targets != -100), top, targets)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA: the kernels under the interpreter
    h, w, b = (x.detach().to(dev) for x in (hidden, weight, bias))
    _, stats = fused_linear_loss(h, w, targets.to(dev), lambda lp, ent, rows: lp, bias=b, backend="triton",
                                 token_chunk=5, temperature=1.3, extras=("mean_logits", "is_top1"))
    ref = linear_token_stats(hidden.detach().double(), weight.detach().double(), targets, bias=bias.detach().double(),
                             temperature=1.3, backend="torch", extras=("mean_logits", "is_top1"))
    valid = targets != -100
    torch.testing.assert_close(stats.mean_logits.cpu()[valid].double(), ref.mean_logits[valid].double(), atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(stats.is_top1.cpu()[valid], ref.is_top1[valid])
    assert stats.is_top1[valid.to(dev)].any() and not stats.is_top1[valid.to(dev)].all()


def test_the_weight_gradient_can_accumulate_into_the_weights_own_grad():
    gen, hidden, weight, bias, targets = _problem(13, dtype=torch.float32)
    loss_fn = _generic_loss_fn(gen)
    leaves = _leaves(hidden, weight, bias)
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="chunked", token_chunk=7)
    expected = torch.autograd.grad(loss, leaves)
    weight.grad = torch.full_like(weight, 0.5)  # an earlier micro-batch's gradient, accumulated on top
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="chunked", token_chunk=7,
                                weight_grad=weight.grad)
    loss.backward()
    torch.testing.assert_close(weight.grad, expected[1] + 0.5)  # no second [V, d] buffer, and autograd adds none
    torch.testing.assert_close(hidden.grad, expected[0])
    loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, bias=bias, backend="chunked",
                                weight_grad=weight.grad)
    with pytest.raises(RuntimeError, match="the loss was scaled after the op"):
        (loss * 0.5).backward()
    with pytest.raises(ValueError, match="weight_grad: expected a torch.float32 tensor shaped like the weight"):
        fused_linear_loss(hidden, weight, targets, loss_fn, weight_grad=torch.zeros(3, 3), backend="chunked")
