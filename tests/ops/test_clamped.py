"""Clamped entropy (``ops/clamped.py``): hand-computed values and the tie rule for the float64 reference, then the
chunked op (materialized logits and the fused head) against it, forward and backward, at odd sizes, with ``-inf``
columns, ties at the cut, a top-p head larger than the first candidate set, and through the public dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.ops import linear_logprob_and_entropy, linear_token_stats, logprob_and_entropy
from llm_entreg.ops import clamped as clamped_module
from llm_entreg.ops.clamped import check_clamp, clamp_active, clamped_linear_entropy, clamped_logits_entropy
from llm_entreg.ops.reference import reference_clamped_entropy, reference_token_stats


def _entropy(probs):
    return -sum(p * math.log(p) for p in probs)


def test_reference_keeps_the_head_renormalised_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    tgt = torch.zeros(1, dtype=torch.long)
    h = reference_clamped_entropy(logits, tgt, top_p=0.79, dtype=torch.float64)
    assert h.item() == pytest.approx(_entropy([0.5 / 0.8, 0.3 / 0.8]), abs=1e-12)  # 0.5 + 0.3 reaches 0.79
    h = reference_clamped_entropy(logits, tgt, top_p=0.81, dtype=torch.float64)
    assert h.item() == pytest.approx(_entropy([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]), abs=1e-12)
    h = reference_clamped_entropy(logits, tgt, top_k=1, dtype=torch.float64)
    assert h.item() == 0.0
    # top-k first (0.5, 0.3, 0.15 renormalised by 0.95), then top-p 0.8 within it: 0.526 + 0.316 >= 0.8
    h = reference_clamped_entropy(logits, tgt, top_k=3, top_p=0.8, dtype=torch.float64)
    assert h.item() == pytest.approx(_entropy([0.5 / 0.8, 0.3 / 0.8]), abs=1e-12)
    got = clamped_logits_entropy(logits.float(), tgt, 1.0, -100, 0.8, 3)
    assert got.item() == pytest.approx(_entropy([0.5 / 0.8, 0.3 / 0.8]), abs=1e-6)
    assert h.item() == pytest.approx(_entropy([0.5 / 0.8, 0.3 / 0.8]), abs=1e-12)


def test_every_token_tied_at_the_cut_is_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, -5.0]], dtype=torch.float64)
    tgt = torch.zeros(2, dtype=torch.long)
    h = reference_clamped_entropy(logits, tgt, top_k=2, dtype=torch.float64)
    z = math.e ** 2 + 3 * math.e  # row 0 keeps 2.0 and all three tied 1.0s
    assert h[0].item() == pytest.approx(_entropy([math.e ** 2 / z] + [math.e / z] * 3), abs=1e-12)
    assert h[1].item() == pytest.approx(math.log(4), abs=1e-12)  # the four tied 1.0s
    h = reference_clamped_entropy(logits, tgt, top_p=0.3, dtype=torch.float64)
    assert h[1].item() == pytest.approx(math.log(4), abs=1e-12)  # a cut inside a tie keeps the whole tie
    got = clamped_logits_entropy(logits.float(), tgt, 1.0, -100, None, 2, vocab_chunk=2)
    torch.testing.assert_close(got.double(), reference_clamped_entropy(logits, tgt, top_k=2, dtype=torch.float64))


def test_top_p_one_is_the_plain_entropy_and_neg_inf_columns_are_never_kept():
    torch.manual_seed(1)
    logits = torch.randn(5, 11, dtype=torch.float64)
    logits[:, 3] = float("-inf")
    tgt = torch.zeros(5, dtype=torch.long)
    plain = reference_token_stats(logits, tgt, dtype=torch.float64).entropy
    torch.testing.assert_close(reference_clamped_entropy(logits, tgt, top_p=1.0, dtype=torch.float64), plain)
    torch.testing.assert_close(reference_clamped_entropy(logits, tgt, top_k=11, dtype=torch.float64), plain)
    assert not clamp_active(1.0, None) and clamp_active(1.0, 5) and clamp_active(0.9, None)


def _case(seed, n, v, d, dtype=torch.float64, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype) / math.sqrt(d) * 3
    bias = torch.randn(v, generator=g, dtype=dtype)
    if neg_inf:
        bias[::7] = float("-inf")
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, bias, targets, torch.randn(n, generator=g, dtype=dtype)


CLAMPS = [(0.9, None), (0.5, None), (None, 7), (0.8, 20), (0.95, 3), (None, 1)]


@pytest.mark.parametrize("top_p, top_k", CLAMPS)
@pytest.mark.parametrize("neg_inf", [False, True])
def test_chunked_matches_the_float64_reference_forward_and_backward(top_p, top_k, neg_inf):
    hidden, weight, bias, targets, up = _case(3, 37, 103, 16, neg_inf=neg_inf)
    logits = (hidden @ weight.t() + bias).requires_grad_(True)
    ref = reference_clamped_entropy(logits, targets, top_p=top_p, top_k=top_k, temperature=1.3, dtype=torch.float64)
    (ref * up).sum().backward()
    # materialized logits, fp32
    z = logits.detach().float().requires_grad_(True)
    got = clamped_logits_entropy(z, targets, 1.3, -100, top_p, top_k, token_chunk=8, vocab_chunk=10)
    (got * up.float()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), logits.grad, atol=2e-5, rtol=1e-5)
    # the fused head: gradients to hidden, weight, bias through the logits' chain rule
    h, w, b = (x.float().requires_grad_(True) for x in (hidden, weight, bias))
    got = clamped_linear_entropy(h, w, b, targets, 1.3, -100, top_p, top_k, token_chunk=8, vocab_chunk=10)
    (got * up.float()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    g = torch.where(torch.isfinite(logits.grad), logits.grad, torch.zeros_like(logits.grad))
    torch.testing.assert_close(h.grad.double(), g @ weight, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), g.t() @ hidden, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(b.grad.double(), g.sum(0), atol=5e-5, rtol=1e-4)
    assert (got[targets == -100] == 0).all() and (h.grad[targets == -100] == 0).all()


def test_a_top_p_head_wider_than_the_first_candidates_is_found(monkeypatch):
    monkeypatch.setattr(clamped_module, "TOP_P_CANDIDATES", 3)  # forces the candidate set to grow 3 -> 6 -> 12 ...
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 200, generator=g, dtype=torch.float64) * 0.3  # flat rows: the 0.9 head is ~170 tokens
    targets = torch.zeros(9, dtype=torch.long)
    ref = reference_clamped_entropy(logits, targets, top_p=0.9, dtype=torch.float64)
    got = clamped_logits_entropy(logits.float(), targets, 1.0, -100, 0.9, None, vocab_chunk=64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert ref.min() > math.log(100)  # the head really was wider than the first candidates


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_the_public_ops_return_full_log_probs_and_the_clamped_entropy(backend):
    hidden, weight, bias, targets, _ = _case(7, 13, 61, 8, dtype=torch.float32)
    lp, h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, backend=backend, clamp_top_p=0.7)
    plain_lp, plain_h = linear_logprob_and_entropy(hidden, weight, targets, bias=bias, backend=backend)
    torch.testing.assert_close(lp, plain_lp)
    ref = reference_clamped_entropy((hidden @ weight.t() + bias).double(), targets, top_p=0.7, dtype=torch.float64)
    torch.testing.assert_close(h.double(), ref, atol=2e-5, rtol=1e-5)
    assert (h <= plain_h + 1e-6).all()  # a renormalised head is never more spread than the whole distribution
    logits = hidden @ weight.t() + bias
    lp2, h2 = logprob_and_entropy(logits, targets, backend=backend, clamp_top_k=5)
    ref2 = reference_clamped_entropy(logits.double(), targets, top_k=5, dtype=torch.float64)
    torch.testing.assert_close(h2.double(), ref2, atol=2e-5, rtol=1e-5)
    stats = linear_token_stats(hidden, weight, targets, bias=bias, backend=backend, extras=("is_top1",),
                               clamp_top_k=5)
    assert stats.is_top1 is not None


@pytest.mark.parametrize("top_p, top_k, message", [
    (0.0, None, "clamp_top_p: expected a probability in \\(0, 1\\]"), (1.5, None, "clamp_top_p"),
    (None, 0, "clamp_top_k: expected an integer >= 1"), (None, 2.5, "clamp_top_k"),
])
def test_invalid_clamps_are_refused_naming_the_argument(top_p, top_k, message):
    with pytest.raises(ValueError, match=message):
        check_clamp(top_p, top_k)
