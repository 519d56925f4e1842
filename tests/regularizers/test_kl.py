"""KL estimators and controllers, against hand-computed numbers."""

from __future__ import annotations

import io
import math

import pytest
import torch

from llm_entreg.regularizers import (
    AdaptiveKLController,
    FixedKLController,
    kl_in_loss,
    kl_in_reward,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
)

LOGP = [-1.0, -2.0, -0.5]
REF = [-1.5, -1.0, -0.5]
# d = logp - ref = [0.5, -1.0, 0.0];  r = ref - logp = [-0.5, 1.0, 0.0]
K1 = [0.5, -1.0, 0.0]
K2 = [0.125, 0.5, 0.0]  # d^2 / 2
K3 = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]  # e^r - r - 1 = [0.1065307, 0.7182818, 0]


def _t(x, **kw):
    return torch.tensor([x], dtype=torch.float64, **kw)


def test_estimator_values():
    assert kl_k1(_t(LOGP), _t(REF)).tolist() == [K1]
    assert kl_k2(_t(LOGP), _t(REF)).tolist() == [K2]
    assert torch.allclose(kl_k3(_t(LOGP), _t(REF)), _t(K3))
    assert K3[0] == pytest.approx(0.10653066) and K3[1] == pytest.approx(0.71828183)
    for name, expected in (("k1", K1), ("kl", K1), ("k2", K2), ("mse", K2), ("k3", K3), ("low_var_kl", K3)):
        assert torch.allclose(kl_penalty(_t(LOGP), _t(REF), name), _t(expected)), name
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(_t(LOGP), _t(REF), "k4")


def test_k3_nonnegative_finite_and_clamped():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=g) * 30
    ref = torch.randn(1000, generator=g) * 30
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        k3 = kl_k3(logp.to(dtype), ref.to(dtype))
        assert torch.isfinite(k3).all() and (k3 >= 0).all()
    # |r| = 50 is clamped to 20: e^20 - 20 - 1, and e^-20 + 20 - 1
    big = kl_k3(torch.tensor([-60.0, -10.0], dtype=torch.float64), torch.tensor([-10.0, -60.0], dtype=torch.float64))
    assert big[0].item() == pytest.approx(math.exp(20) - 21)
    assert big[1].item() == pytest.approx(math.exp(-20) + 19)
    # tiny r: expm1(r) - r ~ r^2 / 2, no cancellation to 0 or below
    tiny = kl_k3(torch.tensor([0.0]), torch.tensor([1e-3]))
    assert tiny.item() == pytest.approx(0.5e-6, rel=1e-3)


def test_k3_gradient_is_one_minus_ratio():
    logp = _t(LOGP, requires_grad=True)
    kl_k3(logp, _t(REF)).sum().backward()
    # d/dlogp (e^r - r - 1) = 1 - e^r = [1 - e^-0.5, 1 - e, 0]
    assert torch.allclose(logp.grad, _t([1 - math.exp(-0.5), 1 - math.e, 0.0]))


def test_kl_in_reward():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.1]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = kl_in_reward(rewards, logp, ref, coef=0.1, estimator="k1", mask=mask)
    # r - 0.1 * k1 = [0 - 0.05, 0 + 0.1, 1 - 0, (masked: unchanged) 0]
    assert torch.allclose(out, torch.tensor([[-0.05, 0.1, 1.0, 0.0]]))
    assert not out.requires_grad  # the penalty is detached
    with pytest.raises(ValueError, match="kl_coef"):
        kl_in_reward(rewards, logp, ref, coef=-0.1)


def test_kl_in_loss():
    logp = _t(LOGP, requires_grad=True)
    mask = torch.tensor([[1, 1, 1]])
    term = kl_in_loss(logp, _t(REF), mask, coef=0.04)  # k3, token-mean
    # 0.04 * (0.1065307 + 0.7182818 + 0) / 3 = 0.04 * 0.2749375 = 0.0109975
    assert term.item() == pytest.approx(0.0109975, rel=1e-5)
    term.backward()
    assert torch.allclose(logp.grad, 0.04 / 3 * _t([1 - math.exp(-0.5), 1 - math.e, 0.0]))
    # k2 with seq-mean-token-sum: 0.5 * (0.125 + 0.5 + 0) / 1 sequence = 0.3125
    assert kl_in_loss(_t(LOGP), _t(REF), mask, 0.5, "k2", "seq-mean-token-sum").item() == pytest.approx(0.3125)
    assert kl_in_loss(_t(LOGP), _t(REF), mask, 0.0).item() == 0.0


def test_adaptive_kl_controller_trajectory_and_state():
    ctl = AdaptiveKLController(kl_coef=0.2, target_kl=6.0, horizon=10000)
    # 9/6 - 1 = 0.5 -> clipped 0.2 -> x (1 + 0.2 * 1000/10000) = x 1.02 -> 0.204
    assert ctl.update(9.0, 1000) == pytest.approx(0.204)
    # 3/6 - 1 = -0.5 -> -0.2 -> x 0.98 -> 0.19992
    assert ctl.update(3.0, 1000) == pytest.approx(0.19992)
    # 6.6/6 - 1 = 0.1 -> x 1.01 -> 0.2019192
    assert ctl.update(6.6, 1000) == pytest.approx(0.2019192)
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    buf.seek(0)
    fresh = AdaptiveKLController()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.value == ctl.value and fresh.update(7.0, 500) == ctl.update(7.0, 500)
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(target_kl=0)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(horizon=-1)
    with pytest.raises(ValueError, match="state_dict"):
        fresh.load_state_dict(FixedKLController(0.1).state_dict())


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
