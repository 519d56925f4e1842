"""GRPO's per-token loss, its loss_type normalizations and its loss-fused form (``losses/grpo.py``) against TRL's
formulas computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.losses import LOSS_TYPE_AGGREGATION, grpo_fused_token_loss, grpo_loss_weights, grpo_token_loss


def test_grpo_token_loss_hand_values():
    """TRL's per-token GRPO loss: clipping by the sign of A, delta caps only the unclipped ratio, k3 KL."""
    lp = torch.tensor([math.log(1.5), math.log(1.5), math.log(1.5), math.log(0.9)], dtype=torch.float64,
                      requires_grad=True)
    old = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    plain = grpo_token_loss(lp, old, adv, 0.2, 0.2)
    # rho 1.5, A > 0: clipped at 1.2 -> -1.2; A < 0: the unclipped 1.5 counts -> 1.5; rho 0.9 inside -> -0.9
    torch.testing.assert_close(plain, torch.tensor([-1.2, 1.5, 1.5, -0.9], dtype=torch.float64))
    capped = grpo_token_loss(lp, old, adv, 0.2, 0.2, delta=1.3)
    torch.testing.assert_close(capped, torch.tensor([-1.2, 1.3, 1.3, -0.9], dtype=torch.float64))
    (grad,) = torch.autograd.grad(plain[3], lp)  # d(-rho A)/dlp = -rho A inside the clip range, 0 where clipped
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 0.0, -0.9], dtype=torch.float64))
    ref = torch.zeros(4, dtype=torch.float64)
    kl = 2 / 3 + math.log(1.5) - 1  # exp(ref - lp) - (ref - lp) - 1 at lp = log 1.5
    with_kl = grpo_token_loss(lp, old, adv, 0.2, 0.2, ref_logp=ref, beta=0.1)
    assert with_kl[0].item() == pytest.approx(-1.2 + 0.1 * kl, rel=1e-12)
    corrected = grpo_token_loss(lp, old, adv, 0.2, 0.2, ref_logp=ref, beta=0.1, bias_correction_kl=True)
    assert corrected[0].item() == pytest.approx(-1.2 + 0.1 * kl * 1.5, rel=1e-12)
    assert torch.equal(grpo_token_loss(lp, old, adv, 0.2, 0.2, ref_logp=ref, beta=0.0), plain)


MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
LOSS = torch.tensor([[0.5, -1.0, 2.0, 9.0], [3.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]], dtype=torch.float64)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPE_AGGREGATION))
def test_loss_weights_reproduce_trls_normalization(loss_type):
    """TRL 1.16's formulas (grpo_trainer.py ``_compute_loss``), written out for this batch, GA = 2."""
    ga, max_len = 2, 4
    masked = LOSS * MASK
    if loss_type == "grpo":  # mean over rows of the per-row token mean (empty row: 0), / GA
        expected = ((masked.sum(-1) / MASK.sum(-1).clamp(min=1.0)).mean() / ga).item()
    elif loss_type == "bnpo":  # token mean over the micro-batch, / GA
        expected = (masked.sum() / MASK.sum() / ga).item()
    elif loss_type == "dr_grpo":  # sum / (rows * max_completion_length), / GA
        expected = (masked.sum() / (3 * max_len) / ga).item()
    else:  # dapo: sum / the given token count (already per micro-batch)
        expected = (masked.sum() / 5.0).item()
    w = grpo_loss_weights(MASK, loss_type, accumulation_steps=ga, max_completion_length=max_len, dapo_token_count=5.0)
    assert w.shape == MASK.shape and (w[MASK == 0] == 0).all()
    assert (w.double() * LOSS).sum().item() == pytest.approx(expected, rel=1e-6)
    hand = {"grpo": (0.5 - 1.0 + 2.0) / 3 / 3 / 2 + 3.0 / 1 / 3 / 2, "bnpo": 4.5 / 4 / 2,
            "dr_grpo": 4.5 / 12 / 2, "dapo": 4.5 / 5}[loss_type]
    assert expected == pytest.approx(hand)


def test_loss_weights_refuse_an_unsupported_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss_weights(MASK, "cispo")
    with pytest.raises(ValueError, match="dapo_token_count"):
        grpo_loss_weights(MASK, "dapo")


def test_fused_token_loss_is_weighted_loss_plus_entropy_term():
    gen = torch.Generator().manual_seed(7)
    n = 8
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.float32)
    weights = torch.rand(n, generator=gen)
    adv = torch.randn(n, generator=gen)
    old = -torch.rand(n, generator=gen)
    ref = old - 0.1
    ew = -0.01 * torch.rand(n, generator=gen)
    lp = (old + 0.3 * torch.randn(n, generator=gen)).double()
    ent = torch.rand(n, generator=gen, dtype=torch.float64)
    rows = torch.arange(n)
    fn = grpo_fused_token_loss(mask, weights, adv, old, ref, ew, clip_low=0.2, clip_high=0.28, beta=0.04)
    got = fn(lp, ent, rows)
    per = grpo_token_loss(lp, old.double(), adv.double(), 0.2, 0.28, None, ref.double(), 0.04)
    expected = torch.where(mask.bool(), per, torch.zeros_like(per)) * weights.double() + ew.double() * ent
    torch.testing.assert_close(got, expected)
    on_policy = grpo_fused_token_loss(mask, weights, adv, None, None, ew, clip_low=0.2, clip_high=0.2)
    lp_leaf = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(on_policy(lp_leaf, ent, rows).sum(), [lp_leaf])
    # on-policy, ratio 1: d/dlp of -A * rho = -A on tokens that count
    torch.testing.assert_close(g, torch.where(mask.bool(), -adv * weights, torch.zeros_like(adv)).double())
