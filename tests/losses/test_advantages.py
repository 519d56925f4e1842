"""Per-token rewards, GAE, whitening and explained variance (``losses/advantages.py``) against hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm_entreg.losses import (
    explained_variance,
    gae,
    last_token_index,
    masked_mean_var,
    reference_ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from llm_entreg.regularizers import entropy_reward, kl_in_reward, kl_penalty, sampled_entropy_reward

from .helpers import F64, INF, NAN, finite, t


# Rows: 3 tokens then padding (early EOS); 1 token; EMPTY; full row (truncated, no padding).
MASK4 = [
    [1, 1, 1, 0],
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [1, 1, 1, 1],
]


def test_last_token_index():
    idx, has = last_token_index(t(MASK4, dtype=torch.bool))
    assert idx.tolist() == [2, 0, -1, 3]
    assert has.tolist() == [True, True, False, True]
    # left padding and a hole: still the largest masked-in position
    idx, has = last_token_index(t([[0, 1, 1], [1, 0, 1]]))
    assert idx.tolist() == [2, 2] and has.all()
    idx, has = last_token_index(torch.zeros(2, 0))
    assert idx.tolist() == [-1, -1] and not has.any()


def test_token_rewards_score_on_last_real_token_with_kl():
    score = t([2.0, -1.0, 5.0, 3.0])
    kl = t(
        [
            [0.1, 0.2, 0.3, NAN],  # padding may hold anything
            [0.5, 9.0, 9.0, 9.0],
            [NAN, 1.0, 1.0, 1.0],  # empty row
            [0.0, -0.1, 0.2, 0.4],
        ]
    )
    r = token_rewards(score, t(MASK4), kl_per_token=kl, kl_coef=0.5)
    expected = [
        [-0.05, -0.10, -0.15 + 2.0, 0.0],  # -0.5 * KL, score 2 on token 2
        [-0.25 - 1.0, 0.0, 0.0, 0.0],  # single token: -0.5 * 0.5 + score -1
        [0.0, 0.0, 0.0, 0.0],  # empty row: no score, no penalty, no NaN
        [0.0, 0.05, -0.10, -0.20 + 3.0],  # score 3 on the last column
    ]
    assert torch.allclose(r, t(expected), atol=1e-12)
    assert r.dtype == F64

    # score only; [B, 1] score; bool mask; tensor coefficient
    r0 = token_rewards(score[:, None], t(MASK4, dtype=torch.bool))
    assert r0.tolist() == [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]
    r_t = token_rewards(score, t(MASK4), kl_per_token=kl, kl_coef=torch.tensor(0.5, dtype=F64))
    assert torch.allclose(r_t, r)


def test_token_rewards_kl_in_reward_k1_k3():
    # Same numbers as tests/regularizers/test_kl.py: d = logp - ref = [0.5, -1, 0], r = ref - logp = [-0.5, 1, 0]
    logp, ref = t([[-1.0, -2.0, -0.5]]), t([[-1.5, -1.0, -0.5]])
    mask = torch.ones(1, 3)
    score = t([1.0])
    # k1 = [0.5, -1, 0]; beta = 0.1 -> -0.1 * k1 = [-0.05, 0.1, 0]; score 1 on the last token
    r1 = token_rewards(score, mask, kl_penalty(logp, ref, "k1"), kl_coef=0.1)
    assert torch.allclose(r1, t([[-0.05, 0.1, 1.0]]))
    # k3 = e^r - r - 1 = [e^-0.5 - 0.5, e - 2, 0] = [0.1065307, 0.7182818, 0]
    r3 = token_rewards(score, mask, kl_penalty(logp, ref, "k3"), kl_coef=0.1)
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
    assert torch.allclose(r3, t([[-0.1 * k3[0], -0.1 * k3[1], 1.0]]))
    assert r3[0, 0].item() == pytest.approx(-0.01065307) and r3[0, 1].item() == pytest.approx(-0.07182818)
    # identical to the regularizer's kl_in_reward applied to the score-only reward
    for est in ("k1", "k3"):
        expected = kl_in_reward(token_rewards(score, mask), logp, ref, 0.1, est, mask)
        assert torch.allclose(token_rewards(score, mask, kl_penalty(logp, ref, est), 0.1), expected)


def test_token_rewards_entropy_bonus_and_detach():
    mask = t([[1, 1, 0]])
    score = t([1.0])
    # exact: alpha * H = 0.1 * [1, 2, (pad)] = [0.1, 0.2, 0]; score on token 1
    h = t([[1.0, 2.0, 0.5]], requires_grad=True)
    r = token_rewards(score, mask, entropy_bonus=entropy_reward(h, mask, 0.1))
    assert torch.allclose(r, t([[0.1, 1.2, 0.0]]))
    # sampled: -alpha * log pi = -0.1 * [-1, -3] = [0.1, 0.3]
    lp = t([[-1.0, -3.0, NAN]], requires_grad=True)
    kl = t([[0.2, 0.4, 0.0]], requires_grad=True)
    r = token_rewards(score, mask, kl_per_token=kl, kl_coef=0.5, entropy_bonus=sampled_entropy_reward(lp, mask, 0.1))
    # -0.5 * [0.2, 0.4] + [0.1, 0.3] + [0, 1] = [0.0, 1.1]
    assert torch.allclose(r, t([[0.0, 1.1, 0.0]]))
    assert not r.requires_grad


def test_token_rewards_validation():
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(t([1.0]), torch.ones(1, 2), torch.zeros(1, 2), kl_coef=-0.1)
    with pytest.raises(ValueError, match="score"):
        token_rewards(t([1.0, 2.0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="kl_per_token"):
        token_rewards(t([1.0]), torch.ones(1, 2), torch.zeros(1, 3), kl_coef=0.1)


def test_gae_hand_three_tokens():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); rewards [0, 0, 1]; values [0.5, 0.4, 0.3]; V after = 0
    # t=2: delta = 1 + 0.9*0 - 0.3 = 0.7                      A2 = 0.7
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13                  A1 = -0.13 + 0.72*0.7   = 0.374
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14                  A0 = -0.14 + 0.72*0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t([[0.12928, 0.374, 0.7]]), atol=1e-12)
    assert torch.allclose(ret, t([[0.62928, 0.774, 1.0]]), atol=1e-12)
    assert adv.dtype == ret.dtype == F64


def test_gae_batch_with_padding_early_eos_empty_and_single_token():
    rewards = t(
        [
            [0.0, 0.0, 1.0, 9.0],  # 3 tokens, then padding
            [0.0, 1.0, 7.0, 7.0],  # early EOS: 2 tokens
            [NAN, 5.0, 5.0, 5.0],  # empty row
            [2.0, INF, 3.0, 3.0],  # single token
        ]
    )
    values = t(
        [
            [0.5, 0.4, 0.3, NAN],
            [0.5, 0.4, 9.0, 9.0],
            [NAN, NAN, NAN, NAN],
            [0.5, NAN, 1.0, 1.0],
        ]
    )
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: t=1: delta = 1 - 0.4 = 0.6 -> A1 = 0.6 (V after the EOS is 0, not the padding's 9)
    #        t=0: delta = 0.9*0.4 - 0.5 = -0.14 -> A0 = -0.14 + 0.72*0.6 = 0.292; returns [0.792, 1.0]
    # row 3: A = 2 - 0.5 = 1.5, return 2
    exp_adv = [[0.12928, 0.374, 0.7, 0.0], [0.292, 0.6, 0.0, 0.0], [0.0] * 4, [1.5, 0.0, 0.0, 0.0]]
    exp_ret = [[0.62928, 0.774, 1.0, 0.0], [0.792, 1.0, 0.0, 0.0], [0.0] * 4, [2.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(adv, t(exp_adv), atol=1e-12)
    assert torch.allclose(ret, t(exp_ret), atol=1e-12)
    assert finite(adv, ret)


def test_gae_limits_monte_carlo_and_td0():
    r, v, m = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t = [6 - 0.5, 5 - 1, 3 - 1.5]; returns = reward-to-go [6, 5, 3]
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[5.5, 4.0, 1.5]])) and torch.allclose(ret, t([[6.0, 5.0, 3.0]]))
    # lam = 0 (gamma = 1): A_t = delta_t = r_t + V_{t+1} - V_t = [1 + 1 - 0.5, 2 + 1.5 - 1, 3 - 1.5]
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    assert torch.allclose(adv, t([[1.5, 2.5, 1.5]]))
    # defaults gamma = 1, lam = 0.95 on a sparse terminal reward: A_t = 0.95^(2-t) * 1 - ... by hand:
    # t=2: A = 1 - 0.3 = 0.7; t=1: delta = 0.3 - 0.4 = -0.1, A = -0.1 + 0.95*0.7 = 0.565;
    # t=0: delta = 0.4 - 0.5 = -0.1, A = -0.1 + 0.95*0.565 = 0.43675
    adv, _ = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), m)
    assert torch.allclose(adv, t([[0.43675, 0.565, 0.7]]))


@pytest.mark.parametrize(
    "rewards, values, mask, cols",
    [
        # a hole in the middle is skipped (its junk reward / NaN value is never read)
        ([[0.1, 50.0, 0.2, 0.3, 60.0]], [[0.5, NAN, 0.6, 0.7, NAN]], [[1, 0, 1, 1, 0]], [0, 2, 3]),
        # left padding
        ([[NAN, NAN, 0.1, 0.2, 0.3]], [[NAN, NAN, 0.5, 0.6, 0.7]], [[0, 0, 1, 1, 1]], [2, 3, 4]),
    ],
)
def test_gae_masked_positions_are_not_time_steps(rewards, values, mask, cols):
    adv, ret = gae(t(rewards), t(values), t(mask), gamma=0.9, lam=0.8)
    # same as the compacted row of the three real tokens
    ref_adv, ref_ret = gae(t([[0.1, 0.2, 0.3]]), t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, cols], ref_adv) and torch.allclose(ret[:, cols], ref_ret)
    others = [c for c in range(5) if c not in cols]
    assert (adv[:, others] == 0).all() and (ret[:, others] == 0).all()


def test_gae_validation_and_detached():
    r = torch.zeros(1, 2, requires_grad=True)
    adv, ret = gae(r, r, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="gamma"):
        gae(r, r, torch.ones(1, 2), gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, r, torch.ones(1, 2), lam=-0.1)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.zeros(1, 3), torch.ones(1, 2))


def test_whiten_hand():
    x = t([[2.0, 4.0, NAN], [6.0, INF, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # masked values 2, 4, 6: mean 4; unbiased var (4 + 0 + 4) / 2 = 4 (sd 2); biased var 8/3
    w = whiten(x, mask, eps=0.0)
    assert torch.allclose(w, t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(whiten(x, mask, shift_mean=False, eps=0.0), t([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]]))
    s = math.sqrt(3.0 / 8.0)
    assert torch.allclose(whiten(x, mask, eps=0.0, unbiased=False), t([[-2 * s, 0.0, 0.0], [2 * s, 0.0, 0.0]]))
    # default eps = 1e-8: (x - 4) / sqrt(4 + 1e-8)
    assert torch.allclose(whiten(x, mask), t([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]) / math.sqrt(4 + 1e-8))
    mean, var, n = masked_mean_var(x, mask)
    assert (mean.item(), var.item(), n.item()) == (4.0, 4.0, 3.0)


def test_whiten_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=F64) * 3.0 + 1.5
    lengths = torch.tensor([7, 3, 0, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    x = x.masked_fill(~mask, NAN)
    w = whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert w[mask].var(unbiased=True).item() == pytest.approx(1.0, abs=1e-8)
    assert (w[~mask] == 0).all()
    wb = whiten(x, mask, unbiased=False)
    assert wb[mask].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-8)
    # shift_mean=False keeps the mean, rescales the spread
    ws = whiten(x, mask, shift_mean=False)
    assert ws[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-12)
    assert ws[mask].var().item() == pytest.approx(1.0, abs=1e-8)
    # no process group: distributed=True is the local computation
    assert torch.equal(whiten(x, mask, distributed=True), w)


def test_whiten_empty_and_single_token_no_nan():
    x = t([[3.0, NAN]])
    for mask in (t([[0, 0]]), t([[1, 0]])):
        for unbiased in (True, False):
            w = whiten(x, mask, unbiased=unbiased)
            assert torch.equal(w, torch.zeros_like(w))
            ws = whiten(x, mask, shift_mean=False, unbiased=unbiased)
            assert ws.tolist() == [[3.0 if mask[0, 0] else 0.0, 0.0]]
    # gradient through whitening stays finite with an empty row next to real ones
    xg = t([[1.0, 2.0], [5.0, 5.0]], requires_grad=True)
    whiten(xg, t([[1, 1], [0, 0]])).pow(2).sum().backward()
    assert finite(xg.grad)


WORLD = 2


# rank 0: masked values 1, 2, 3, 4 (T = 3); rank 1: 10, 20 (T = 2) -> global batch of 6 values
DIST_DATA = {
    0: ([[1.0, 2.0, NAN], [3.0, 4.0, NAN]], [[1, 1, 0], [1, 1, 0]]),
    1: ([[10.0, NAN], [20.0, 99.0]], [[1, 0], [1, 0]]),
}


def _whiten_worker(rank: int, tmp: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        x, m = DIST_DATA[rank]
        w = whiten(t(x), t(m), distributed=True)
        mean, var, n = masked_mean_var(t(x), t(m), distributed=True)
        result = {"w": w.tolist(), "stats": [mean.item(), var.item(), n.item()]}
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def test_whiten_distributed_two_processes(tmp_path, run_ranks):
    run_ranks(_whiten_worker, WORLD, tmp_path)
    # global values 1, 2, 3, 4, 10, 20: mean 40/6 = 20/3; unbiased var = sum (x - mean)^2 / 5
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0], dtype=F64)
    mean, var = vals.mean().item(), vals.var(unbiased=True).item()
    assert mean == pytest.approx(20 / 3)
    for r in range(WORLD):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["stats"] == pytest.approx([mean, var, 6.0])
        x, m = DIST_DATA[r]
        expected = torch.where(t(m) != 0, (t(x) - mean) / math.sqrt(var + 1e-8), t(0.0))
        assert torch.allclose(t(out["w"]), expected)


def test_explained_variance():
    mask = t([[1, 1, 0], [1, 0, 0]])
    target = t([[1.0, 2.0, NAN], [3.0, 7.0, 7.0]])
    assert explained_variance(target, target, mask).item() == 1.0  # perfect predictor
    # pred [1, 2, 4]: residuals [0, 0, -1], biased var 1/3 - 1/9 = 2/9; Var[target] = 2/3 -> 1 - 1/3 = 2/3
    pred = t([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    assert explained_variance(pred, target, mask).item() == pytest.approx(2 / 3)
    # predicting the mean explains nothing; a constant offset is still "perfect" (variance of the residual)
    assert explained_variance(torch.full_like(target, 2.0), target, mask).item() == pytest.approx(0.0)
    assert explained_variance(target + 5.0, target, mask).item() == pytest.approx(1.0)
    # empty mask, single token, constant target: 0, never NaN
    assert explained_variance(pred, target, t([[0, 0, 0], [0, 0, 0]])).item() == 0.0
    assert explained_variance(pred, target, t([[1, 0, 0], [0, 0, 0]])).item() == 0.0
    assert explained_variance(pred, torch.ones_like(target), mask).item() == 0.0
    assert explained_variance(target, target, mask).dtype == F64


def test_dtypes():
    m = torch.ones(1, 2)
    for dt, out in ((F64, F64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x = torch.tensor([[0.5, -0.25]], dtype=dt)
        assert token_rewards(torch.tensor([1.0], dtype=dt), m, x, 0.1).dtype == out
        assert all(t.dtype == out for t in gae(x, x, m))
        assert whiten(x, m).dtype == out
        assert reference_ppo_policy_loss(x, x, x, m)[0].dtype == out
        assert value_loss(x, x, x, m)[0].dtype == out
        assert explained_variance(x, x, m).dtype == out
