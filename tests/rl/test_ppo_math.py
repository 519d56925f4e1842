"""PPO-RLHF math (llm_entreg.rl.ppo) against hand-computed numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm_entreg.regularizers import entropy_reward, kl_in_reward, kl_penalty, sampled_entropy_reward
from llm_entreg.rl import (
    explained_variance,
    gae,
    last_token_index,
    masked_mean_var,
    ppo_policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def _t(x, dtype=F64, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def _finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts)


# --------------------------------------------------------------------------------------------------------------
# last_token_index / token_rewards
# --------------------------------------------------------------------------------------------------------------

# Rows: 3 tokens then padding (early EOS); 1 token; EMPTY; full row (truncated, no padding).
MASK4 = [
    [1, 1, 1, 0],
    [1, 0, 0, 0],
    [0, 0, 0, 0],
    [1, 1, 1, 1],
]


def test_last_token_index():
    idx, has = last_token_index(_t(MASK4, dtype=torch.bool))
    assert idx.tolist() == [2, 0, -1, 3]
    assert has.tolist() == [True, True, False, True]
    # left padding and a hole: still the largest masked-in position
    idx, has = last_token_index(_t([[0, 1, 1], [1, 0, 1]]))
    assert idx.tolist() == [2, 2] and has.all()
    idx, has = last_token_index(torch.zeros(2, 0))
    assert idx.tolist() == [-1, -1] and not has.any()


def test_token_rewards_score_on_last_real_token_with_kl():
    score = _t([2.0, -1.0, 5.0, 3.0])
    kl = _t(
        [
            [0.1, 0.2, 0.3, NAN],  # padding may hold anything
            [0.5, 9.0, 9.0, 9.0],
            [NAN, 1.0, 1.0, 1.0],  # empty row
            [0.0, -0.1, 0.2, 0.4],
        ]
    )
    r = token_rewards(score, _t(MASK4), kl_per_token=kl, kl_coef=0.5)
    expected = [
        [-0.05, -0.10, -0.15 + 2.0, 0.0],  # -0.5 * KL, score 2 on token 2
        [-0.25 - 1.0, 0.0, 0.0, 0.0],  # single token: -0.5 * 0.5 + score -1
        [0.0, 0.0, 0.0, 0.0],  # empty row: no score, no penalty, no NaN
        [0.0, 0.05, -0.10, -0.20 + 3.0],  # score 3 on the last column
    ]
    assert torch.allclose(r, _t(expected), atol=1e-12)
    assert r.dtype == F64

    # score only; [B, 1] score; bool mask; tensor coefficient
    r0 = token_rewards(score[:, None], _t(MASK4, dtype=torch.bool))
    assert r0.tolist() == [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3]]
    r_t = token_rewards(score, _t(MASK4), kl_per_token=kl, kl_coef=torch.tensor(0.5, dtype=F64))
    assert torch.allclose(r_t, r)


def test_token_rewards_kl_in_reward_k1_k3():
    # Same numbers as tests/regularizers/test_kl.py: d = logp - ref = [0.5, -1, 0], r = ref - logp = [-0.5, 1, 0]
    logp, ref = _t([[-1.0, -2.0, -0.5]]), _t([[-1.5, -1.0, -0.5]])
    mask = torch.ones(1, 3)
    score = _t([1.0])
    # k1 = [0.5, -1, 0]; beta = 0.1 -> -0.1 * k1 = [-0.05, 0.1, 0]; score 1 on the last token
    r1 = token_rewards(score, mask, kl_penalty(logp, ref, "k1"), kl_coef=0.1)
    assert torch.allclose(r1, _t([[-0.05, 0.1, 1.0]]))
    # k3 = e^r - r - 1 = [e^-0.5 - 0.5, e - 2, 0] = [0.1065307, 0.7182818, 0]
    r3 = token_rewards(score, mask, kl_penalty(logp, ref, "k3"), kl_coef=0.1)
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
    assert torch.allclose(r3, _t([[-0.1 * k3[0], -0.1 * k3[1], 1.0]]))
    assert r3[0, 0].item() == pytest.approx(-0.01065307) and r3[0, 1].item() == pytest.approx(-0.07182818)
    # identical to the regularizer's kl_in_reward applied to the score-only reward
    for est in ("k1", "k3"):
        expected = kl_in_reward(token_rewards(score, mask), logp, ref, 0.1, est, mask)
        assert torch.allclose(token_rewards(score, mask, kl_penalty(logp, ref, est), 0.1), expected)


def test_token_rewards_entropy_bonus_and_detach():
    mask = _t([[1, 1, 0]])
    score = _t([1.0])
    # exact: alpha * H = 0.1 * [1, 2, (pad)] = [0.1, 0.2, 0]; score on token 1
    h = _t([[1.0, 2.0, 0.5]], requires_grad=True)
    r = token_rewards(score, mask, entropy_bonus=entropy_reward(h, mask, 0.1))
    assert torch.allclose(r, _t([[0.1, 1.2, 0.0]]))
    # sampled: -alpha * log pi = -0.1 * [-1, -3] = [0.1, 0.3]
    lp = _t([[-1.0, -3.0, NAN]], requires_grad=True)
    kl = _t([[0.2, 0.4, 0.0]], requires_grad=True)
    r = token_rewards(score, mask, kl_per_token=kl, kl_coef=0.5, entropy_bonus=sampled_entropy_reward(lp, mask, 0.1))
    # -0.5 * [0.2, 0.4] + [0.1, 0.3] + [0, 1] = [0.0, 1.1]
    assert torch.allclose(r, _t([[0.0, 1.1, 0.0]]))
    assert not r.requires_grad


def test_token_rewards_validation():
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(_t([1.0]), torch.ones(1, 2), torch.zeros(1, 2), kl_coef=-0.1)
    with pytest.raises(ValueError, match="score"):
        token_rewards(_t([1.0, 2.0]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="kl_per_token"):
        token_rewards(_t([1.0]), torch.ones(1, 2), torch.zeros(1, 3), kl_coef=0.1)


# --------------------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------------------


def test_gae_hand_three_tokens():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); rewards [0, 0, 1]; values [0.5, 0.4, 0.3]; V after = 0
    # t=2: delta = 1 + 0.9*0 - 0.3 = 0.7                      A2 = 0.7
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13                  A1 = -0.13 + 0.72*0.7   = 0.374
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14                  A0 = -0.14 + 0.72*0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]
    adv, ret = gae(_t([[0.0, 0.0, 1.0]]), _t([[0.5, 0.4, 0.3]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, _t([[0.12928, 0.374, 0.7]]), atol=1e-12)
    assert torch.allclose(ret, _t([[0.62928, 0.774, 1.0]]), atol=1e-12)
    assert adv.dtype == ret.dtype == F64


def test_gae_batch_with_padding_early_eos_empty_and_single_token():
    rewards = _t(
        [
            [0.0, 0.0, 1.0, 9.0],  # 3 tokens, then padding
            [0.0, 1.0, 7.0, 7.0],  # early EOS: 2 tokens
            [NAN, 5.0, 5.0, 5.0],  # empty row
            [2.0, INF, 3.0, 3.0],  # single token
        ]
    )
    values = _t(
        [
            [0.5, 0.4, 0.3, NAN],
            [0.5, 0.4, 9.0, 9.0],
            [NAN, NAN, NAN, NAN],
            [0.5, NAN, 1.0, 1.0],
        ]
    )
    mask = _t([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: t=1: delta = 1 - 0.4 = 0.6 -> A1 = 0.6 (V after the EOS is 0, not the padding's 9)
    #        t=0: delta = 0.9*0.4 - 0.5 = -0.14 -> A0 = -0.14 + 0.72*0.6 = 0.292; returns [0.792, 1.0]
    # row 3: A = 2 - 0.5 = 1.5, return 2
    exp_adv = [[0.12928, 0.374, 0.7, 0.0], [0.292, 0.6, 0.0, 0.0], [0.0] * 4, [1.5, 0.0, 0.0, 0.0]]
    exp_ret = [[0.62928, 0.774, 1.0, 0.0], [0.792, 1.0, 0.0, 0.0], [0.0] * 4, [2.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(adv, _t(exp_adv), atol=1e-12)
    assert torch.allclose(ret, _t(exp_ret), atol=1e-12)
    assert _finite(adv, ret)


def test_gae_limits_monte_carlo_and_td0():
    r, v, m = _t([[1.0, 2.0, 3.0]]), _t([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    # gamma = lam = 1: A_t = sum_{s>=t} r_s - V_t = [6 - 0.5, 5 - 1, 3 - 1.5]; returns = reward-to-go [6, 5, 3]
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, _t([[5.5, 4.0, 1.5]])) and torch.allclose(ret, _t([[6.0, 5.0, 3.0]]))
    # lam = 0 (gamma = 1): A_t = delta_t = r_t + V_{t+1} - V_t = [1 + 1 - 0.5, 2 + 1.5 - 1, 3 - 1.5]
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    assert torch.allclose(adv, _t([[1.5, 2.5, 1.5]]))
    # defaults gamma = 1, lam = 0.95 on a sparse terminal reward: A_t = 0.95^(2-t) * 1 - ... by hand:
    # t=2: A = 1 - 0.3 = 0.7; t=1: delta = 0.3 - 0.4 = -0.1, A = -0.1 + 0.95*0.7 = 0.565;
    # t=0: delta = 0.4 - 0.5 = -0.1, A = -0.1 + 0.95*0.565 = 0.43675
    adv, _ = gae(_t([[0.0, 0.0, 1.0]]), _t([[0.5, 0.4, 0.3]]), m)
    assert torch.allclose(adv, _t([[0.43675, 0.565, 0.7]]))


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
    adv, ret = gae(_t(rewards), _t(values), _t(mask), gamma=0.9, lam=0.8)
    # same as the compacted row of the three real tokens
    ref_adv, ref_ret = gae(_t([[0.1, 0.2, 0.3]]), _t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
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


# --------------------------------------------------------------------------------------------------------------
# Whitening
# --------------------------------------------------------------------------------------------------------------


def test_whiten_hand():
    x = _t([[2.0, 4.0, NAN], [6.0, INF, 0.0]])
    mask = _t([[1, 1, 0], [1, 0, 0]])
    # masked values 2, 4, 6: mean 4; unbiased var (4 + 0 + 4) / 2 = 4 (sd 2); biased var 8/3
    w = whiten(x, mask, eps=0.0)
    assert torch.allclose(w, _t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(whiten(x, mask, shift_mean=False, eps=0.0), _t([[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]]))
    s = math.sqrt(3.0 / 8.0)
    assert torch.allclose(whiten(x, mask, eps=0.0, unbiased=False), _t([[-2 * s, 0.0, 0.0], [2 * s, 0.0, 0.0]]))
    # default eps = 1e-8: (x - 4) / sqrt(4 + 1e-8)
    assert torch.allclose(whiten(x, mask), _t([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]) / math.sqrt(4 + 1e-8))
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
    x = _t([[3.0, NAN]])
    for mask in (_t([[0, 0]]), _t([[1, 0]])):
        for unbiased in (True, False):
            w = whiten(x, mask, unbiased=unbiased)
            assert torch.equal(w, torch.zeros_like(w))
            ws = whiten(x, mask, shift_mean=False, unbiased=unbiased)
            assert ws.tolist() == [[3.0 if mask[0, 0] else 0.0, 0.0]]
    # gradient through whitening stays finite with an empty row next to real ones
    xg = _t([[1.0, 2.0], [5.0, 5.0]], requires_grad=True)
    whiten(xg, _t([[1, 1], [0, 0]])).pow(2).sum().backward()
    assert _finite(xg.grad)


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
        w = whiten(_t(x), _t(m), distributed=True)
        mean, var, n = masked_mean_var(_t(x), _t(m), distributed=True)
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
        expected = torch.where(_t(m) != 0, (_t(x) - mean) / math.sqrt(var + 1e-8), _t(0.0))
        assert torch.allclose(_t(out["w"]), expected)


# --------------------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------------------

# Row 0: (A=+1, rho=1.5), (A=+1, rho=0.5), (A=-1, rho=0.5), pad;  row 1: (A=-1, rho=1.5), (A=+2, rho=1.1), pad, pad
ADV = [[1.0, 1.0, -1.0, NAN], [-1.0, 2.0, NAN, 5.0]]
RHO = [[1.5, 0.5, 0.5, 1.0], [1.5, 1.1, 1.0, 1.0]]
PMASK = [[1, 1, 1, 0], [1, 1, 0, 0]]
OLD = [[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, NAN, -1.0]]


def _policy_inputs():
    old = _t(OLD)
    logp = (old + torch.log(_t(RHO))).masked_fill(_t(PMASK) == 0, NAN).requires_grad_(True)
    return logp, old, _t(ADV), _t(PMASK)


def test_policy_loss_hand_clip_higher():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
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
    assert torch.allclose(logp.grad, _t(expected))


def test_policy_loss_symmetric_clip():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = ppo_policy_loss(logp, old, adv, mask)  # 0.2 / 0.2
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
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.28, loss_agg_mode=mode, **kwargs)
    assert loss.item() == pytest.approx(expected)


def test_policy_loss_on_policy_gradient_is_minus_advantage():
    adv = _t([[0.5, -2.0, 1.0]])
    logp = _t([[-1.0, -0.3, -2.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, torch.ones(1, 3))
    assert loss.item() == pytest.approx(-(0.5 - 2.0 + 1.0) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 3)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["policy_kl_k3"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


def test_policy_loss_empty_mask_and_single_token():
    logp = _t([[NAN, -1.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, _t([[NAN, -1.0]]), _t([[NAN, 1.0]]), _t([[0, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and _finite(logp.grad, *stats.values())
    logp = _t([[-1.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, _t([[-1.0 - math.log(2.0)]]), _t([[3.0]]), _t([[1]]))
    # rho = 2 > 1.2 with A = 3 > 0: clipped, L = -3 * 1.2
    assert loss.item() == pytest.approx(-3.6) and stats["clipfrac_high"].item() == 1.0


def test_policy_loss_extreme_ratio_is_finite_and_validation():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)  # float32
    loss, stats = ppo_policy_loss(logp, torch.tensor([[-200.0, 200.0]]), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert _finite(loss, logp.grad, *stats.values())
    with pytest.raises(ValueError, match="clip_low"):
        ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), clip_high=-0.1)
    with pytest.raises(ValueError, match="loss_agg_mode|mode"):
        ppo_policy_loss(logp, logp, logp, torch.ones(1, 2), loss_agg_mode="sum")


# --------------------------------------------------------------------------------------------------------------
# Value loss / explained variance
# --------------------------------------------------------------------------------------------------------------


def test_value_loss_hand():
    values = _t([[0.5, 0.5, 0.1, 0.5, NAN]], requires_grad=True)
    old = _t([[0.0, 0.0, 0.0, 1.0, NAN]])
    ret = _t([[1.0, 0.0, 1.0, 2.0, NAN]])
    mask = _t([[1, 1, 1, 1, 0]])
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
    assert torch.allclose(values.grad, _t([[0.0, 0.5 / 4, -0.9 / 4, -1.5 / 4, 0.0]]))
    # without clipping: 0.5 * (0.25 + 0.25 + 0.81 + 2.25) / 4 = 0.445
    loss_nc, stats_nc = value_loss(values, old, ret, mask, clip_range_value=None)
    assert loss_nc.item() == pytest.approx(0.445) and stats_nc["vf_clipfrac"].item() == 0.0
    # seq-mean-token-sum: one row, sum 1.975
    assert value_loss(values, old, ret, mask, loss_agg_mode="seq-mean-token-sum")[0].item() == pytest.approx(1.975)


def test_value_loss_empty_mask_no_nan():
    values = _t([[NAN, 1.0]], requires_grad=True)
    loss, stats = value_loss(values, _t([[NAN, 0.0]]), _t([[NAN, 3.0]]), _t([[0, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and _finite(values.grad, *stats.values())
    with pytest.raises(ValueError, match="clip_range_value"):
        value_loss(values, values, values, _t([[1, 1]]), clip_range_value=-1.0)


def test_explained_variance():
    mask = _t([[1, 1, 0], [1, 0, 0]])
    target = _t([[1.0, 2.0, NAN], [3.0, 7.0, 7.0]])
    assert explained_variance(target, target, mask).item() == 1.0  # perfect predictor
    # pred [1, 2, 4]: residuals [0, 0, -1], biased var 1/3 - 1/9 = 2/9; Var[target] = 2/3 -> 1 - 1/3 = 2/3
    pred = _t([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    assert explained_variance(pred, target, mask).item() == pytest.approx(2 / 3)
    # predicting the mean explains nothing; a constant offset is still "perfect" (variance of the residual)
    assert explained_variance(torch.full_like(target, 2.0), target, mask).item() == pytest.approx(0.0)
    assert explained_variance(target + 5.0, target, mask).item() == pytest.approx(1.0)
    # empty mask, single token, constant target: 0, never NaN
    assert explained_variance(pred, target, _t([[0, 0, 0], [0, 0, 0]])).item() == 0.0
    assert explained_variance(pred, target, _t([[1, 0, 0], [0, 0, 0]])).item() == 0.0
    assert explained_variance(pred, torch.ones_like(target), mask).item() == 0.0
    assert explained_variance(target, target, mask).dtype == F64


# --------------------------------------------------------------------------------------------------------------
# dtypes and the whole chain
# --------------------------------------------------------------------------------------------------------------


def test_dtypes():
    m = torch.ones(1, 2)
    for dt, out in ((F64, F64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x = torch.tensor([[0.5, -0.25]], dtype=dt)
        assert token_rewards(torch.tensor([1.0], dtype=dt), m, x, 0.1).dtype == out
        assert all(t.dtype == out for t in gae(x, x, m))
        assert whiten(x, m).dtype == out
        assert ppo_policy_loss(x, x, x, m)[0].dtype == out
        assert value_loss(x, x, x, m)[0].dtype == out
        assert explained_variance(x, x, m).dtype == out


def test_chain_rewards_gae_whiten_losses_no_nan():
    # A batch with an empty row and an early EOS, NaN in the padding of every input
    mask = _t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    pad = mask == 0
    g = torch.Generator().manual_seed(1)
    logp_old = (-torch.rand(3, 4, generator=g, dtype=F64) * 3).masked_fill(pad, NAN)
    ref = (logp_old + 0.1 * torch.randn(3, 4, generator=g, dtype=F64)).masked_fill(pad, NAN)
    v_old = torch.randn(3, 4, generator=g, dtype=F64).masked_fill(pad, NAN)
    score = _t([1.0, -0.5, 2.0])
    bonus = sampled_entropy_reward(logp_old, mask, 0.01)
    rewards = token_rewards(score, mask, kl_penalty(logp_old, ref, "k3"), 0.05, bonus)
    adv, ret = gae(rewards, v_old, mask)
    adv = whiten(adv, mask)
    logp = (logp_old + 0.05).requires_grad_(True)
    values = (v_old + 0.3).requires_grad_(True)
    pl, ps = ppo_policy_loss(logp, logp_old, adv, mask, 0.2, 0.28)
    vl, vs = value_loss(values, v_old, ret, mask)
    (pl + 0.1 * vl).backward()
    assert _finite(rewards, adv, ret, pl, vl, logp.grad, values.grad, *ps.values(), *vs.values())
    assert (logp.grad[pad] == 0).all() and (values.grad[pad] == 0).all()


def test_grpo_token_loss_hand_values():
    """TRL's per-token GRPO loss: clipping by the sign of A, delta caps only the unclipped ratio, k3 KL."""
    from llm_entreg.rl import grpo_token_loss

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
