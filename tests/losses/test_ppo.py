"""PPO's clipped surrogate, its loss-fused form and the clipped value loss (``losses/ppo.py``) against hand-computed
numbers."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.losses import (
    gae,
    ppo_clip_token_loss,
    reference_ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from llm_entreg.regularizers import kl_penalty, sampled_entropy_reward

from .helpers import F64, NAN, finite, t


# Row 0: (A=+1, rho=1.5), (A=+1, rho=0.5), (A=-1, rho=0.5), pad;  row 1: (A=-1, rho=1.5), (A=+2, rho=1.1), pad, pad
ADV = [[1.0, 1.0, -1.0, NAN], [-1.0, 2.0, NAN, 5.0]]


RHO = [[1.5, 0.5, 0.5, 1.0], [1.5, 1.1, 1.0, 1.0]]


PMASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, NAN, -1.0]]


def _policy_inputs():
    old = t(OLD)
    logp = (old + torch.log(t(RHO))).masked_fill(t(PMASK) == 0, NAN).requires_grad_(True)
    return logp, old, t(ADV), t(PMASK)


def test_policy_loss_hand_clip_higher():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = reference_ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # per token L = max(-A rho, -A clip(rho, 0.8, 1.28)):
    #   A=+1, rho=1.5: max(-1.5, -1.28) = -1.28   clipped (high)   -> no gradient
    #   A=+1, rho=0.5: max(-0.5, -0.8)  = -0.5    not clipped (A>0 below the low bound)
    #   A=-1, rho=0.5: max(0.5, 0.8)    =  0.8    clipped (low)    -> no gradient
    #   A=-1, rho=1.5: max(1.5, 1.28)   =  1.5    not clipped (A<0 above the high bound)
    #   A=+2, rho=1.1: max(-2.2, -2.2)  = -2.2    inside the range
    # token-mean: (-1.28 - 0.5 + 0.8 + 1.5 - 2.2) / 5 = -1.68 / 5 = -0.336
    assert loss.item() == pytest.approx(-0.336)
    assert stats["clipfrac_high"].item() == pytest.approx(0.2)
    assert stats["clipfrac_low"].item() == pytest.approx(0.2)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    # ratio mean (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5 = 1.02
    assert stats["ratio_mean"].item() == pytest.approx(1.02)
    # k1 of KL(old || new): mean(-log rho) = -(2 ln 1.5 + 2 ln 0.5 + ln 1.1) / 5 = -(2 ln 0.75 + ln 1.1) / 5
    k1 = -(2 * math.log(0.75) + math.log(1.1)) / 5
    assert k1 == pytest.approx(0.0960108, abs=1e-7)
    assert stats["approx_kl"].item() == pytest.approx(k1)
    # k3: mean(rho - 1 - ln rho) = [2(0.5 - ln 1.5) + 2(-0.5 + ln 2) + (0.1 - ln 1.1)] / 5 = 0.02 + k1
    assert stats["policy_kl_k3"].item() == pytest.approx(0.1160108, abs=1e-7)
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())
    # d L / d logp = -A rho where unclipped, 0 where clipped; / 5 tokens; 0 on padding (which holds NaN)
    loss.backward()
    expected = [[0.0, -0.5 / 5, 0.0, 0.0], [1.5 / 5, -2.2 / 5, 0.0, 0.0]]
    assert torch.allclose(logp.grad, t(expected))


def test_policy_loss_symmetric_clip():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = reference_ppo_policy_loss(logp, old, adv, mask)  # 0.2 / 0.2
    # first token now clipped at 1.2: (-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5 = -1.6 / 5
    assert loss.item() == pytest.approx(-0.32)
    assert stats["clipfrac"].item() == pytest.approx(0.4)


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        # row sums: -1.28 - 0.5 + 0.8 = -0.98 (3 tokens); 1.5 - 2.2 = -0.7 (2 tokens)
        ("seq-mean-token-mean", {}, (-0.98 / 3 - 0.7 / 2) / 2),
        ("seq-mean-token-sum", {}, (-0.98 - 0.7) / 2),
        ("seq-mean-token-sum-norm", {"max_len": 4}, (-0.98 - 0.7) / 2 / 4),
        ("token-mean", {"global_token_count": 10}, -1.68 / 10),
    ],
)
def test_policy_loss_aggregation_modes(mode, kwargs, expected):
    logp, old, adv, mask = _policy_inputs()
    loss, _ = reference_ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28, loss_agg_mode=mode, **kwargs)
    assert loss.item() == pytest.approx(expected)


def test_policy_loss_on_policy_gradient_is_minus_advantage():
    adv = t([[0.5, -2.0, 1.0]])
    logp = t([[-1.0, -0.3, -2.0]], requires_grad=True)
    loss, stats = reference_ppo_policy_loss(logp, logp.detach(), adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-(0.5 - 2.0 + 1.0) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 3)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["policy_kl_k3"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


def test_policy_loss_empty_mask_and_single_token():
    logp = t([[NAN, -1.0]], requires_grad=True)
    loss, stats = reference_ppo_policy_loss(logp, t([[NAN, -1.0]]), t([[NAN, 1.0]]), t([[0, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and finite(logp.grad, *stats.values())
    logp = t([[-1.0]], requires_grad=True)
    loss, stats = reference_ppo_policy_loss(logp, t([[-1.0 - math.log(2.0)]]), t([[3.0]]), t([[1]]))
    # rho = 2 > 1.2 with A = 3 > 0: clipped, L = -3 * 1.2
    assert loss.item() == pytest.approx(-3.6) and stats["clipfrac_high"].item() == 1.0


def test_policy_loss_extreme_ratio_is_finite_and_validation():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)  # float32
    loss, stats = reference_ppo_policy_loss(logp, torch.tensor([[-200.0, 200.0]]), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert finite(loss, logp.grad, *stats.values())
    with pytest.raises(ValueError, match="clip_low"):
        reference_ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        reference_ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), clip_high=-0.1)
    with pytest.raises(ValueError, match="loss_agg_mode|mode"):
        reference_ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), loss_agg_mode="sum")


def test_value_loss_hand():
    values = t([[0.5, 0.5, 0.1, 0.5, NAN]], requires_grad=True)
    old = t([[0.0, 0.0, 0.0, 1.0, NAN]])
    ret = t([[1.0, 0.0, 1.0, 2.0, NAN]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, ret, mask, clip_range_value=0.2)
    # V_clip = old + clip(V - old, +-0.2) = [0.2, 0.2, 0.1, 0.8]
    #   tok 0: (0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64 -> 0.5*0.64 = 0.32    clipped term active -> no gradient
    #   tok 1: (0.5-0)^2 = 0.25, (0.2-0)^2 = 0.04 -> 0.5*0.25 = 0.125   unclipped
    #   tok 2: V inside the range, both 0.81      -> 0.405
    #   tok 3: (0.5-2)^2 = 2.25, (0.8-2)^2 = 1.44 -> 1.125              unclipped
    # mean = (0.32 + 0.125 + 0.405 + 1.125) / 4 = 1.975 / 4 = 0.49375
    assert loss.item() == pytest.approx(0.49375)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.25)
    assert stats["value_mean"].item() == pytest.approx(1.6 / 4) and stats["return_mean"].item() == pytest.approx(1.0)
    # d/dV = (V - R) / 4 where the unclipped term counts, 0 where the clipped one does
    loss.backward()
    assert torch.allclose(values.grad, t([[0.0, 0.5 / 4, -0.9 / 4, -1.5 / 4, 0.0]]))
    # without clipping: 0.5 * (0.25 + 0.25 + 0.81 + 2.25) / 4 = 0.445
    loss_nc, stats_nc = value_loss(values, old, ret, mask, clip_range_value=None)
    assert loss_nc.item() == pytest.approx(0.445) and stats_nc["vf_clipfrac"].item() == 0.0
    # seq-mean-token-sum: one row, sum 1.975
    assert value_loss(values, old, ret, mask, loss_agg_mode="seq-mean-token-sum")[0].item() == pytest.approx(1.975)


def test_value_loss_empty_mask_no_nan():
    values = t([[NAN, 1.0]], requires_grad=True)
    loss, stats = value_loss(values, t([[NAN, 0.0]]), t([[NAN, 3.0]]), t([[0, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and finite(values.grad, *stats.values())
    with pytest.raises(ValueError, match="clip_range_value"):
        value_loss(values, values, values, t([[1, 1]]), clip_range_value=-1.0)


def test_chain_rewards_gae_whiten_losses_no_nan():
    # A batch with an empty row and an early EOS, NaN in the padding of every input
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    pad = mask == 0
    g = torch.Generator().manual_seed(1)
    logp_old = (-torch.rand(3, 4, generator=g, dtype=F64) * 3).masked_fill(pad, NAN)
    ref = (logp_old + 0.1 * torch.randn(3, 4, generator=g, dtype=F64)).masked_fill(pad, NAN)
    v_old = torch.randn(3, 4, generator=g, dtype=F64).masked_fill(pad, NAN)
    score = t([1.0, -0.5, 2.0])
    bonus = sampled_entropy_reward(logp_old, mask, 0.01)
    rewards = token_rewards(score, mask, kl_penalty(logp_old, ref, "k3"), 0.05, bonus)
    adv, ret = gae(rewards, v_old, mask)
    adv = whiten(adv, mask)
    logp = (logp_old + 0.05).requires_grad_(True)
    values = (v_old + 0.3).requires_grad_(True)
    pl, ps = reference_ppo_policy_loss(logp, logp_old, adv, mask, 0.2, 0.28)
    vl, vs = value_loss(values, v_old, ret, mask)
    (pl + 0.1 * vl).backward()
    assert finite(rewards, adv, ret, pl, vl, logp.grad, values.grad, *ps.values(), *vs.values())
    assert (logp.grad[pad] == 0).all() and (values.grad[pad] == 0).all()


def test_ppo_clip_token_loss_is_the_reference_loss_per_token():
    """The loss-fused form, summed, is the reference loss: weights 1/token count, entropy bonus per token."""
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(2, 5, generator=gen, dtype=F64) * 2
    adv = torch.randn(2, 5, generator=gen, dtype=F64)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    lp = old + 0.4 * torch.randn(2, 5, generator=gen, dtype=F64)  # ratios beyond the clip range on some tokens
    ent = torch.rand(2, 5, generator=gen, dtype=F64)
    fn = ppo_clip_token_loss(old, adv, mask, clip_low=0.2, clip_high=0.28, entropy_coef=0.1, normalizer=mask.sum())
    rows = torch.arange(10)
    per_token = fn(lp.reshape(-1), ent.reshape(-1), rows)
    expected, _ = reference_ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    bonus = (ent * mask).sum() / mask.sum()
    assert per_token.shape == (10,)
    assert per_token.sum().item() == pytest.approx((expected - 0.1 * bonus).item(), abs=1e-12)
    assert (per_token[[3, 4]] == 0).all()  # masked-out tokens contribute exactly 0


def test_ppo_clip_token_loss_validates_its_arguments():
    with pytest.raises(ValueError, match="clip_low"):
        ppo_clip_token_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), clip_low=1.0)
    with pytest.raises(ValueError, match="mask"):
        ppo_clip_token_loss(torch.zeros(3), torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="normalizer"):
        ppo_clip_token_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), normalizer=0.0)
