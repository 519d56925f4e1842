"""EntropyBonus and the entropy functions, against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.regularizers import (
    EntropyBonus,
    entropy_loss_term,
    entropy_quantile_threshold,
    top_entropy_mask,
)

# Per-token entropies: row 0 has 3 tokens, row 1 has 1 token; padding holds junk.
H = [[0.5, 1.0, 1.5], [2.0, 7.0, float("nan")]]
MASK = [[1, 1, 1], [1, 0, 0]]


def _h(requires_grad=False):
    return torch.tensor(H, requires_grad=requires_grad), torch.tensor(MASK, dtype=torch.bool)


def test_token_level_sign_magnitude_and_gradient():
    h, m = _h(requires_grad=True)
    bonus = EntropyBonus(entropy_coef=0.1)
    term = bonus.loss_term(h, m)
    # token-mean H = (0.5 + 1 + 1.5 + 2) / 4 = 1.25 -> term = -0.1 * 1.25 = -0.125
    assert term.item() == pytest.approx(-0.125)
    term.backward()
    # d term / d H_t = -beta / count = -0.1 / 4 = -0.025 on the 4 masked tokens, 0 on padding
    assert torch.allclose(h.grad, torch.tensor([[-0.025, -0.025, -0.025], [-0.025, 0.0, 0.0]]))

    # Higher entropy -> lower loss: +1 nat on every token -> mean 2.25 -> term -0.225 < -0.125
    h2, _ = _h()
    assert bonus.loss_term(h2 + 1.0, m).item() == pytest.approx(-0.225)


def test_other_aggregations_at_token_level():
    h, m = _h()
    # seq-mean-token-mean: row means 3/3 = 1.0 and 2.0 -> 1.5 -> -0.1 * 1.5
    assert EntropyBonus(0.1, entropy_loss_agg_mode="seq-mean-token-mean").loss_term(h, m).item() == pytest.approx(-0.15)
    # global token count 8 (e.g. 2 ranks): 5 / 8 -> -0.1 * 0.625
    assert EntropyBonus(0.1).loss_term(h, m, global_token_count=8).item() == pytest.approx(-0.0625)


def test_sequence_level():
    h, m = _h()
    # row sums 3.0 and 2.0 -> mean over 2 sequences 2.5 -> -0.1 * 2.5 = -0.25
    seq = EntropyBonus(0.1, entropy_level="sequence")
    assert seq.agg_mode == "seq-mean-token-sum"
    assert seq.loss_term(h, m).item() == pytest.approx(-0.25)
    # normalised by the constant max_len = 5: (3/5 + 2/5) / 2 = 0.5 -> -0.05
    norm = EntropyBonus(0.1, entropy_level="sequence", entropy_loss_agg_mode="seq-mean-token-sum-norm")
    assert norm.loss_term(h, m, max_len=5).item() == pytest.approx(-0.05)
    # over 4 sequences globally: 5 / 4 -> -0.125
    assert seq.loss_term(h, m, global_seq_count=4).item() == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="entropy_loss_agg_mode"):
        EntropyBonus(0.1, entropy_level="sequence", entropy_loss_agg_mode="token-mean")


# Top-entropy selection: masked entropies 0.1, 0.4, 0.2, 0.3, 0.5 (sorted 0.1 0.2 0.3 0.4 0.5); pad 9.9 / 0.
HQ = torch.tensor([[0.1, 0.4, 0.2, 9.9], [0.3, 0.5, 0.0, 0.0]])
MQ = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_top_entropy_quantile_threshold_and_mask():
    # q = 0.4: the 0.6 quantile, position 0.6 * (5 - 1) = 2.4 -> 0.3 + 0.4 * (0.4 - 0.3) = 0.34 -> keeps 0.4, 0.5
    assert entropy_quantile_threshold(HQ, MQ, 0.4).item() == pytest.approx(0.34)
    sel = top_entropy_mask(HQ, MQ, 0.4)
    assert sel.tolist() == [[False, True, False, False], [False, True, False, False]]
    # q = 0.5: position 2 -> threshold exactly 0.3, kept with >= -> 0.3, 0.4, 0.5
    assert top_entropy_mask(HQ, MQ, 0.5).tolist() == [[False, True, False, False], [True, True, False, False]]
    # q = 1: everything masked in (padding 9.9 never selected); q = 0: only the maximum 0.5
    assert torch.equal(top_entropy_mask(HQ, MQ, 1.0), MQ)
    assert top_entropy_mask(HQ, MQ, 0.0).tolist() == [[False, False, False, False], [False, True, False, False]]
    # external (e.g. all-rank) threshold
    assert top_entropy_mask(HQ, MQ, 0.4, threshold=0.15).sum().item() == 4
    # nothing masked in: nothing selected, no error
    assert not top_entropy_mask(HQ, torch.zeros_like(MQ), 0.2).any()


def test_top_entropy_quantile_in_loss_term():
    # q = 0.4 keeps 0.4 and 0.5 -> mean 0.45 -> -1 * 0.45
    bonus = EntropyBonus(1.0, entropy_bonus_top_quantile=0.4)
    assert bonus.loss_term(HQ, MQ).item() == pytest.approx(-0.45)
    assert bonus.effective_mask(HQ, MQ).sum().item() == 2  # what a trainer counts for global_token_count
    # q = 1: all five, mean 1.5 / 5 = 0.3
    assert EntropyBonus(1.0).loss_term(HQ, MQ).item() == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="entropy_bonus_top_quantile"):
        EntropyBonus(1.0, entropy_bonus_top_quantile=1.5)
    with pytest.raises(ValueError, match="entropy_bonus_top_quantile"):
        EntropyBonus(1.0, entropy_level="sequence", entropy_bonus_top_quantile=0.2)


def test_negative_coef_needs_explicit_flag():
    with pytest.raises(ValueError, match="entropy_coef"):
        EntropyBonus(entropy_coef=-0.01)
    with pytest.raises(ValueError, match="coef"):
        EntropyBonus(0.1).loss_term(*_h(), coef=-0.1)
    mini = EntropyBonus(entropy_coef=-0.1, allow_entropy_minimization=True)
    # minimisation: +0.1 * 1.25 -> the loss rises with entropy
    assert mini.loss_term(*_h()).item() == pytest.approx(0.125)


def test_zero_coef_is_exact_zero_and_all_zero_mask_is_not_nan():
    h, m = _h(requires_grad=True)
    loss = torch.tensor(0.123456789)
    term = EntropyBonus(0.0).loss_term(h, m)
    assert term.item() == 0.0 and torch.equal(loss + term, loss)
    empty = EntropyBonus(0.1).loss_term(h, torch.zeros_like(m))
    assert empty.item() == 0.0
    assert entropy_loss_term(h, torch.zeros_like(m), 0.1, "seq-mean-token-mean").item() == 0.0


def test_controller_coef_per_call():
    h, m = _h()
    # coef passed by a controller overrides entropy_coef: -0.02 * 1.25
    assert EntropyBonus(0.1).loss_term(h, m, coef=0.02).item() == pytest.approx(-0.025)
    assert EntropyBonus(0.1).loss_term(h, m, coef=torch.tensor(0.02)).item() == pytest.approx(-0.025)


def test_reward_level_exact_and_sampled():
    h, m = _h(requires_grad=True)
    bonus = EntropyBonus(0.5, entropy_level="reward")
    r = bonus.reward_term(h, m)
    # 0.5 * H on masked tokens, 0 (not NaN) on padding
    assert r.tolist() == [[0.25, 0.5, 0.75], [1.0, 0.0, 0.0]]
    assert not r.requires_grad
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, float("nan"), -9.0]], requires_grad=True)
    rs = bonus.sampled_reward_term(logp, m)
    # -0.5 * log pi
    assert rs.tolist() == [[0.5, 1.0, 0.25], [1.5, 0.0, 0.0]]
    assert not rs.requires_grad
    # alpha from a controller
    assert bonus.reward_term(h, m, coef=2.0)[0, 0].item() == 1.0


def test_levels_refuse_the_wrong_call():
    h, m = _h()
    with pytest.raises(ValueError, match="entropy_level"):
        EntropyBonus(0.5, entropy_level="reward").loss_term(h, m)
    with pytest.raises(ValueError, match="entropy_level"):
        EntropyBonus(0.5).reward_term(h, m)
    with pytest.raises(ValueError, match="entropy_level"):
        EntropyBonus(0.5, entropy_level="batch")
    with pytest.raises(ValueError, match="entropy_loss_agg_mode"):
        EntropyBonus(0.5, entropy_level="reward", entropy_loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match="entropy_loss_agg_mode"):
        EntropyBonus(0.5, entropy_loss_agg_mode="token-sum")


# ---------------------------------------------------------------- the threshold over every rank


_RANK_ENTROPIES = {  # rank -> (entropies [2, 3], mask): rank 1 has one masked-in token, rank 2 none
    0: ([[0.5, 2.0, 9.0], [1.0, 4.0, 9.0]], [[1, 1, 0], [1, 1, 0]]),
    1: ([[3.0, 9.0, 9.0], [9.0, 9.0, 9.0]], [[1, 0, 0], [0, 0, 0]]),
    2: ([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]], [[0, 0, 0], [0, 0, 0]]),
}


def _threshold_worker(rank: int, tmp: str) -> None:
    import json

    from llm_entreg.regularizers import global_entropy_quantile_threshold

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=3)
    try:
        ent, mask = (torch.tensor(x) for x in _RANK_ENTROPIES[rank])
        thr = global_entropy_quantile_threshold(ent, mask.bool(), 0.4)
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(float(thr), f)


@pytest.mark.slow
def test_global_threshold_is_the_quantile_of_every_ranks_tokens(tmp_path, run_ranks):
    """3 gloo processes holding 4, 1 and 0 masked-in tokens get one threshold: that of the 5 values together."""
    import json

    from llm_entreg.regularizers import entropy_quantile_threshold, global_entropy_quantile_threshold

    run_ranks(_threshold_worker, 3, tmp_path)
    # values 0.5, 1, 2, 3, 4: the 0.6 quantile is at position 0.6 * 4 = 2.4 -> 2 + 0.4 * (3 - 2) = 2.4
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert got == [pytest.approx(2.4)] * 3
    # rank 0 alone would have used its own 4 values: 0.6 * 3 = 1.8 -> 1 + 0.8 * (2 - 1) = 1.8
    ent, mask = (torch.tensor(x) for x in _RANK_ENTROPIES[0])
    assert float(entropy_quantile_threshold(ent, mask.bool(), 0.4)) == pytest.approx(1.8)
    # without a process group the global threshold is the local one
    assert float(global_entropy_quantile_threshold(ent, mask.bool(), 0.4)) == pytest.approx(1.8)
