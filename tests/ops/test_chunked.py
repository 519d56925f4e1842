"""The chunked backend (``ops/chunked.py``) with tiles far smaller than the problem, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.ops.chunked import chunked_linear_token_stats, chunked_token_stats
from llm_entreg.ops.reference import reference_linear_token_stats, reference_token_stats

from .helpers import EXTRAS, grads_of, make_targets, tolerance


@pytest.mark.parametrize("case", range(4))
def test_chunked_online_merge_across_many_small_tiles(case):
    """Tiles far smaller than the problem: the online merge runs across many vocabulary and token blocks."""
    gen = torch.Generator().manual_seed(500 + case)
    n, d, n_vocab = [(29, 7, 257), (64, 13, 100), (5, 3, 1000), (33, 9, 129)][case]
    token_chunk, vocab_chunk = [(8, 17), (7, 64), (2, 999), (32, 1)][case]
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = (torch.randn(n_vocab, d, generator=gen) * 2).requires_grad_(True)
    bias = torch.randn(n_vocab, generator=gen)
    bias[::5] = float("-inf")  # masked vocabulary through the bias
    targets = torch.randint(0, n_vocab, (n,), generator=gen)
    targets = torch.where(torch.isinf(bias[targets]), targets + 1, targets)
    targets[::4] = -100
    bias.requires_grad_(True)
    stats = chunked_linear_token_stats(
        hidden, weight, bias, targets, 1.3, -100, EXTRAS, torch.float32, token_chunk, vocab_chunk
    )
    leaves = [hidden, weight, bias]
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = reference_linear_token_stats(
        ref_leaves[0], ref_leaves[1], targets, bias=ref_leaves[2], temperature=1.3, dtype=torch.float64, extras=EXTRAS
    )
    tol = tolerance(torch.float32)
    torch.testing.assert_close(stats.logprobs.double(), ref.logprobs.detach(), **tol)
    torch.testing.assert_close(stats.entropy.double(), ref.entropy.detach(), **tol)
    torch.testing.assert_close(stats.log_sum_sq_probs.double(), ref.log_sum_sq_probs, **tol)
    assert torch.equal(stats.is_top1, ref.is_top1)
    g_lp, g_h = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    grads = grads_of(stats.logprobs, stats.entropy, leaves, g_lp, g_h)
    ref_grads = grads_of(ref.logprobs, ref.entropy, ref_leaves, g_lp.double(), g_h.double())
    for g, rg in zip(grads, ref_grads):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4)


def test_chunked_logits_path_with_many_tiles():
    gen = torch.Generator().manual_seed(91)
    logits = (torch.randn(41, 203, generator=gen) * 4).requires_grad_(True)
    targets = make_targets(gen, (41,), 203)
    stats = chunked_token_stats(logits, targets, 0.6, -100, EXTRAS, token_chunk=5, vocab_chunk=16)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_token_stats(ref_in, targets, temperature=0.6, dtype=torch.float64, extras=EXTRAS)
    torch.testing.assert_close(stats.entropy.double(), ref.entropy.detach(), atol=2e-5, rtol=2e-5)
    assert torch.equal(stats.is_top1, ref.is_top1)
    g = torch.randn(41, generator=gen)
    (grad,) = torch.autograd.grad((stats.entropy * g).sum(), [logits])
    (rgrad,) = torch.autograd.grad((ref.entropy * g.double()).sum(), [ref_in])
    torch.testing.assert_close(grad.double(), rgrad, atol=2e-5, rtol=2e-5)
