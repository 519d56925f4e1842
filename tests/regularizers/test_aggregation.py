"""aggregate() and the global-normalizer contract, against hand-computed numbers."""

from __future__ import annotations

import json

import pytest
import torch

from llm_entreg.regularizers import (
    LOSS_AGG_MODES,
    aggregate,
    global_mean_loss_scale,
    global_token_and_seq_counts,
    local_token_and_seq_counts,
    token_weights,
)

NAN, INF = float("nan"), float("inf")


def _batch():
    # Row 0: 3 tokens (1, 2, 3); row 1: 1 token (5); row 2: EMPTY. Padding holds inf / nan / junk, which must
    # never be read.
    values = torch.tensor(
        [
            [1.0, 2.0, 3.0, INF],
            [5.0, 6.0, 7.0, 8.0],
            [NAN, 9.0, 9.0, 9.0],
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 0],
            [1, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    return values, mask


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        # (1 + 2 + 3 + 5) / 4 tokens = 11/4
        ("token-mean", {}, 11 / 4),
        # row means 6/3 = 2, 5/1 = 5, empty row 0 -> (2 + 5 + 0) / 3 rows = 7/3
        ("seq-mean-token-mean", {}, 7 / 3),
        # row sums 6, 5, 0 -> 11 / 3 rows
        ("seq-mean-token-sum", {}, 11 / 3),
        # row sums / max_len=4: 1.5, 1.25, 0 -> 2.75 / 3 = 11/12
        ("seq-mean-token-sum-norm", {"max_len": 4}, 11 / 12),
        # global normalizers: 11 / 8 tokens; 11 / 6 sequences
        ("token-mean", {"global_token_count": 8}, 11 / 8),
        ("seq-mean-token-sum", {"global_seq_count": 6}, 11 / 6),
        # (2 + 5 + 0) / 7 sequences
        ("seq-mean-token-mean", {"global_seq_count": torch.tensor(7.0)}, 1.0),
        # counts that do not belong to the mode are ignored
        ("token-mean", {"global_seq_count": 100, "max_len": 100}, 11 / 4),
    ],
)
def test_modes_hand_values(mode, kwargs, expected):
    values, mask = _batch()
    out = aggregate(values, mask, mode, **kwargs)
    assert out.ndim == 0
    assert out.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_zero_mask_gives_zero_not_nan(mode):
    values = torch.tensor([[NAN, 1.0], [2.0, INF]], requires_grad=True)
    mask = torch.zeros(2, 2)
    out = aggregate(values, mask, mode, max_len=2, global_token_count=0, global_seq_count=0)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 2))  # no NaN leaks into the gradient either


def test_float_mask_and_bf16_accumulate_in_float32():
    values = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1.0, 1.0]])
    out = aggregate(values, mask)
    assert out.dtype == torch.float32
    assert out.item() == 2.0  # (1 + 3) / 2


def test_token_mean_gradient_is_one_over_count():
    values = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    aggregate(values, mask).backward()
    # 3 tokens -> 1/3 on each masked token, 0 elsewhere
    assert torch.allclose(values.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_errors_name_the_field():
    values, mask = _batch()
    with pytest.raises(ValueError, match="max_len"):
        aggregate(values, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mode"):
        aggregate(values, mask, "sum")
    with pytest.raises(ValueError, match="mask"):
        aggregate(values, mask[:, :2])
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate(values, mask, global_token_count=-1)


# ---------------------------------------------------------------------------------------------------------------
# Global normalizer: 2 ranks x 2 gradient-accumulation micro-batches, simulated by hand
# ---------------------------------------------------------------------------------------------------------------
#
#   rank 0, mb 0: x = [[1, 2], [3, 4]]   m = [[1, 1], [1, 0]]     sum 6,  3 tokens, 2 rows (means 1.5, 3)
#   rank 0, mb 1: x = [[5, 6]]           m = [[1, 1]]             sum 11, 2 tokens, 1 row  (mean 5.5)
#   rank 1, mb 0: x = [[7, 8, 9]]        m = [[1, 0, 0]]          sum 7,  1 token,  1 row  (mean 7)
#   rank 1, mb 1: x = [[2, 2], [4, 4]]   m = [[0, 0], [1, 1]]     sum 8,  2 tokens, 2 rows (means 0 (empty), 4)
#
#   global: 32 / 8 tokens = 4.0 (token-mean);  (1.5 + 3 + 5.5 + 7 + 0 + 4) / 6 rows = 21 / 6 = 3.5
#   (seq-mean-token-mean).
MICRO = {
    (0, 0): ([[1.0, 2.0], [3.0, 4.0]], [[1, 1], [1, 0]]),
    (0, 1): ([[5.0, 6.0]], [[1, 1]]),
    (1, 0): ([[7.0, 8.0, 9.0]], [[1, 0, 0]]),
    (1, 1): ([[2.0, 2.0], [4.0, 4.0]], [[0, 0], [1, 1]]),
}
WORLD, GA = 2, 2


def _simulate(mode, global_kw, scale, framework_divisor=1.0):
    """Per-rank accumulated grads of w (values = w * x at w = 1), then DDP's average over ranks."""
    rank_grads, contributions = [], []
    for r in range(WORLD):
        w = torch.tensor(1.0, requires_grad=True)  # this rank's replica of the parameter
        for g in range(GA):
            x, m = MICRO[(r, g)]
            c = aggregate(w * torch.tensor(x), torch.tensor(m), mode, **global_kw)
            contributions.append(c.item())
            loss = c * scale / framework_divisor  # what the framework backpropagates
            loss.backward()  # gradient accumulation: .grad sums over micro-batches
        rank_grads.append(w.grad.item())
    return sum(rank_grads) / WORLD, contributions  # DDP all-reduce averages


def test_global_token_mean_over_ranks_and_micro_batches():
    # Single batch: the concatenated (padded) global batch.
    x = torch.tensor([[1, 2, 0], [3, 4, 0], [5, 6, 0], [7, 8, 9], [2, 2, 0], [4, 4, 0]], dtype=torch.float32)
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    assert aggregate(x, m).item() == 4.0  # 32 / 8

    n_tokens = sum(torch.tensor(mm).sum().item() for _, mm in MICRO.values())
    assert n_tokens == 8
    ddp_grad, contributions = _simulate("token-mean", {"global_token_count": n_tokens}, scale=WORLD)
    # contributions 6/8, 11/8, 7/8, 8/8 sum to exactly the global mean
    assert contributions == pytest.approx([6 / 8, 11 / 8, 7 / 8, 8 / 8])
    assert sum(contributions) == pytest.approx(4.0)
    # grads per rank: 2 * (6 + 11) / 8 = 4.25 and 2 * (7 + 8) / 8 = 3.75 -> DDP average 4.0 = d(w * 4.0)/dw
    assert ddp_grad == pytest.approx(4.0)

    # Without the x world_size factor DDP averaging halves it ...
    assert _simulate("token-mean", {"global_token_count": 8}, scale=1.0)[0] == pytest.approx(2.0)
    # ... and local means divided by GA (the naive recipe) give (2 + 5.5 + 7 + 4) / 4 = 4.625, not 4.0.
    assert _simulate("token-mean", {}, scale=1.0, framework_divisor=GA)[0] == pytest.approx(4.625)


def test_global_scale_helper_and_framework_divisor():
    assert global_mean_loss_scale(WORLD) == 2.0
    assert global_mean_loss_scale() == 1.0  # torch.distributed not initialized here
    # A framework that divides the loss by GA (HF Trainer without num_items_in_batch): scale = W * GA = 4.
    scale = global_mean_loss_scale(WORLD, framework_loss_divisor=GA)
    assert scale == 4.0
    ddp_grad, _ = _simulate("token-mean", {"global_token_count": 8}, scale=scale, framework_divisor=GA)
    assert ddp_grad == pytest.approx(4.0)
    with pytest.raises(ValueError, match="world_size"):
        global_mean_loss_scale(0)
    with pytest.raises(ValueError, match="framework_loss_divisor"):
        global_mean_loss_scale(2, framework_loss_divisor=0)


def test_global_seq_mean_over_ranks_and_micro_batches():
    ddp_grad, contributions = _simulate("seq-mean-token-mean", {"global_seq_count": 6}, scale=WORLD)
    # contributions (1.5 + 3)/6, 5.5/6, 7/6, (0 + 4)/6 -> sum 21/6 = 3.5
    assert contributions == pytest.approx([4.5 / 6, 5.5 / 6, 7 / 6, 4 / 6])
    assert ddp_grad == pytest.approx(3.5)


def test_counts_single_process_is_local_sum():
    masks = [torch.tensor(MICRO[(0, g)][1]) for g in range(GA)]
    tokens, seqs = global_token_and_seq_counts(masks)  # no process group: no-op reduction
    assert (tokens.item(), seqs.item()) == (5.0, 3.0)  # 3 + 2 tokens, 2 + 1 rows
    assert tuple(t.item() for t in local_token_and_seq_counts(masks[0])) == (3.0, 2.0)


def _counts_worker(rank: int, tmp: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        masks = [torch.tensor(MICRO[(rank, g)][1]) for g in range(GA)]
        tokens, seqs = global_token_and_seq_counts(masks)
        result = [tokens.item(), seqs.item(), global_mean_loss_scale()]
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_counts_all_reduce_two_processes(tmp_path, run_ranks):
    run_ranks(_counts_worker, WORLD, tmp_path)
    # 3 + 2 + 1 + 2 = 8 tokens, 2 + 1 + 1 + 2 = 6 rows on every rank; scale = world size 2
    for r in range(WORLD):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == [8.0, 6.0, 2.0]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("counts", [{}, {"global_token_count": 23.0, "global_seq_count": 9.0}])
@pytest.mark.parametrize("float_mask", [False, True])
def test_token_weights_reproduce_aggregate_for_every_mode(mode, counts, float_mask):
    """aggregate(v) == (token_weights * v).sum(), for every mode, with and without global counts, for a bool mask and a
    float weight mask, empty rows included; the weights are 0 off the mask and carry no gradient."""
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) < 0.6
    mask[2] = False  # an empty row
    mask = mask.double() * torch.rand(4, 6, generator=gen, dtype=torch.float64) if float_mask else mask
    values = values.masked_fill(~(mask != 0), float("nan"))  # padding is never read
    kwargs = dict(counts, max_len=6) if mode == "seq-mean-token-sum-norm" else dict(counts)
    w = token_weights(mask, mode, dtype=torch.float64, **kwargs)
    assert w.shape == mask.shape and not w.requires_grad and (w[mask == 0] == 0).all()
    expected = aggregate(values, mask, mode, **kwargs)
    got = torch.where(mask != 0, w * values, torch.zeros((), dtype=w.dtype)).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)


def test_token_weights_hand_values():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(token_weights(mask, "token-mean"), torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))
    torch.testing.assert_close(token_weights(mask, "seq-mean-token-mean"),
                               torch.tensor([[0.25, 0.25, 0], [0.5, 0, 0]]))
    torch.testing.assert_close(token_weights(mask, "seq-mean-token-sum", global_seq_count=4),
                               torch.tensor([[0.25, 0.25, 0], [0.25, 0, 0]]))
    torch.testing.assert_close(token_weights(mask, "seq-mean-token-sum-norm", max_len=5),
                               torch.tensor([[0.1, 0.1, 0], [0.1, 0, 0]]))
    with pytest.raises(ValueError, match="max_len"):
        token_weights(mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="^mode: unknown aggregation mode"):
        token_weights(mask, "token-sum")
