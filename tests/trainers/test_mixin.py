"""The shared trainer plumbing (``trainers/mixin.py``): global token and sequence counts and the framework scale
against a fake accelerator (W ranks x G accumulation steps give the exact global mean), the per-token weights of the
term, the once-per-optimizer-step controller update, and, on a real DPO run, the NaN stop."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llm_entreg.recipes import load_recipe
from llm_entreg.run import build, make_trainer
from llm_entreg.trainers import EntropyRegularizationArguments, NonFiniteLossError
from llm_entreg.trainers.mixin import STATE_FILE, EntropyRegularizationMixin

ROOT = Path(__file__).resolve().parents[2]
DPO = ROOT / "recipes" / "dpo_entropy.yaml"


@dataclass
class _Args(EntropyRegularizationArguments):
    max_steps: int = 10
    max_completion_length: int = 6


class _FakeAccelerator:
    """``W`` ranks that hold identical tensors: a sum over ranks is ``W`` times the local value."""

    def __init__(self, world: int):
        self.num_processes = world
        self.device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor * self.num_processes if reduction == "sum" else tensor

    def gather_for_metrics(self, tensor):
        return tensor.repeat(self.num_processes)


class _Base:
    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback):
        self.callbacks.append(callback)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return list(epoch_iterator)[:num_batches], None


class _Trainer(EntropyRegularizationMixin, _Base):
    def __init__(self, world=1, ga=1, divides_by_ga=True, **fields):
        super().__init__()
        self.args = _Args(**fields)
        self.accelerator = _FakeAccelerator(world)
        self.current_gradient_accumulation_steps = ga
        self._trainer_divides_loss_by_ga = divides_by_ga
        self._metrics = defaultdict(lambda: defaultdict(list))
        self._entropy_setup()

    def _entropy_mask(self, inputs):
        return inputs["mask"]


def _micro_batches(seed, g=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(g):
        rows, cols = 2 + i, 6
        mask = torch.rand(rows, cols, generator=gen) < 0.3 + 0.2 * i  # different token counts per micro-batch
        mask[0, 0] = True
        out.append((torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 3, mask))
    return out


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("divides_by_ga", [True, False])
def test_global_counts_and_scale_give_the_exact_global_aggregate(mode, divides_by_ga):
    """W = 2 ranks (identical here), G = 3 micro-batches: after the framework's division by G (when it divides) and
    DDP's average over ranks, the summed contributions equal -β x the aggregate over the whole optimizer step."""
    world, ga, coef = 2, 3, 0.2
    level = "token" if mode in ("token-mean", "seq-mean-token-mean") else "sequence"
    trainer = _Trainer(world, ga, divides_by_ga, entropy_coef=coef, entropy_level=level, entropy_loss_agg_mode=mode)
    batches = _micro_batches(0, ga)
    trainer.get_batch_samples(iter([{"mask": m} for _, m in batches]), ga, torch.device("cpu"))
    tokens, seqs = trainer._entropy_window_counts
    assert tokens.item() == world * sum(m.sum().item() for _, m in batches)
    assert seqs.item() == world * sum(m.shape[0] for _, m in batches)
    total = 0.0
    for entropy, mask in batches:
        term, scale, _ = trainer._entropy_term(entropy, mask, "train")
        weights, _ = trainer._entropy_token_weights(mask, "train")
        assert (weights * entropy).sum().item() == pytest.approx((term * scale).item(), rel=1e-6)  # fp32 weights
        total += (term * scale).item() / (ga if divides_by_ga else 1) * world / world  # W identical ranks, averaged
    all_h = [h[m] for h, m in batches]
    n_rows = sum(m.shape[0] for _, m in batches)
    if mode == "token-mean":
        expected = torch.cat(all_h).mean().item()
    elif mode == "seq-mean-token-sum":
        expected = sum((h * m).sum().item() for h, m in batches) / n_rows
    elif mode == "seq-mean-token-sum-norm":
        expected = sum((h * m).sum().item() for h, m in batches) / n_rows / 6
    else:
        per_row = [((h * m).sum(-1) / m.sum(-1).clamp(min=1)) for h, m in batches]
        expected = torch.cat(per_row).sum().item() / n_rows
    assert total == pytest.approx(-coef * expected, rel=1e-10)


def test_without_global_counts_the_term_is_the_micro_batch_mean_averaged_over_the_window():
    trainer = _Trainer(world=2, ga=4, entropy_coef=0.5, entropy_bonus_top_quantile=0.5)
    entropy, mask = _micro_batches(1, 1)[0]
    term, scale, _ = trainer._entropy_term(entropy, mask, "train")
    assert scale == 1.0  # HF divides by GA itself: the window's mean of micro-batch terms
    assert trainer._global_aggregation("eval", torch.device("cpu")) == ({}, 1.0)


def test_controller_steps_once_per_optimizer_step_on_the_token_weighted_mean():
    trainer = _Trainer(world=2, ga=2, entropy_coef=0.1, entropy_controller="target_entropy", entropy_target=1.0,
                       entropy_coef_delta=0.05)
    batches = _micro_batches(2, 2)
    trainer.get_batch_samples(iter([{"mask": m} for _, m in batches]), 2, torch.device("cpu"))
    for entropy, mask in batches:
        term, _, parts = trainer._entropy_term(entropy, mask, "train")
        trainer._entropy_metrics(entropy, mask, "train", term, parts)
    assert trainer.entropy_coefficient.num_steps == 0  # micro-batches never step the controller
    trainer._entropy_end_of_step()
    measured = torch.cat([h[m] for h, m in batches]).mean().item()
    assert trainer.entropy_coefficient.last_entropy == pytest.approx(measured, rel=1e-6)
    assert trainer.entropy_coefficient.num_steps == 1
    assert trainer.entropy_coefficient.coef == pytest.approx(0.1 + (0.05 if measured < 1.0 else -0.05))
    assert trainer._metrics["train"]["entropy_coef"] == [0.0, 0.0]  # nothing measured before the first step


def test_config_errors_name_the_config_field():
    with pytest.raises(ValueError, match="^entropy_loss_agg_mode:"):
        _Trainer(entropy_level="sequence", entropy_loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match="^entropy_target_ratio:"):
        _Trainer(entropy_coef=0.1, entropy_controller="learned_alpha", entropy_target=0.5, entropy_target_ratio=0.5)
    with pytest.raises(ValueError, match="^entropy_coef_end:"):
        _Trainer(entropy_coef=0.1, entropy_schedule="exponential", entropy_coef_end=0.0)


def _recipe(tmp_path, *overrides):
    return load_recipe(DPO, [f"output_dir={tmp_path}", "logging_steps=1", "save_strategy=no",
                             "evaluation.num_prompts=96", *overrides])


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_after_saving_a_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, "max_steps=3", "evaluation.held_out=false", "entropy_coef=0.1")
    pieces = build(recipe, log=lambda *a: None)
    trainer = make_trainer(recipe, pieces)
    with torch.no_grad():
        trainer.model.get_output_embeddings().weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="step 0"):
        trainer.train()
    assert (tmp_path / "checkpoint-0" / STATE_FILE).is_file()



def _metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
