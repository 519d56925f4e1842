"""EntropyGRPOTrainer: our bonus off = TRL's GRPO loss; ours on = TRL's own bonus at the same β (one source only);
a short run raises reward, and β > 0 keeps entropy above the β = 0 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from llm_entreg.recipes import load_recipe
from llm_entreg.run import run
from llm_entreg.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

from .grpo_helpers import generation_batch, grpo_fields, grpo_trainer, loss_and_grads

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("coef, top_q", [(0.0, 1.0), (0.3, 1.0), (0.3, 0.5)])
def test_matches_trl_grpo_with_the_same_entropy_coef(default, tmp_path, coef, top_q):
    """β = 0: TRL's GRPO loss exactly (on our fused head). β > 0: equal to TRL's own token-mean bonus at that β
    (single process, GA 1, where the two normalizations coincide) — so the term is applied once, not twice.
    top_q < 1: TRL's policy loss and bonus on its top-entropy tokens = ours with both quantiles set to q."""
    model = default.load_model()
    theirs = grpo_trainer(GRPOTrainer, GRPOConfig, model, default, tmp_path, entropy_coef=coef, top_entropy_quantile=top_q)
    ours = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, entropy_coef=coef,
                    top_entropy_quantile=top_q, entropy_bonus_top_quantile=top_q)
    inputs = generation_batch(theirs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-5)
    assert grads_o.keys() == grads_t.keys()
    nonzero = 0
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)
        nonzero += int(grads_t[name].abs().max() > 0)
    assert nonzero > 0
    if coef:
        plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, entropy_coef=0.0)
        _, grads_0 = loss_and_grads(plain, inputs)
        assert any(not torch.allclose(grads_0[n], grads_o[n]) for n in grads_o)


def test_config_refuses_trl_adaptive_and_negative_coef(tmp_path):
    with pytest.raises(ValueError, match="^use_adaptive_entropy"):
        EntropyGRPOConfig(**grpo_fields(tmp_path), use_adaptive_entropy=True)
    with pytest.raises(ValueError, match="^entropy_coef"):
        EntropyGRPOConfig(**grpo_fields(tmp_path), entropy_coef=-1.0)


@pytest.mark.slow
def test_grpo_run_raises_reward_and_bonus_keeps_entropy_higher(tmp_path):
    def go(name, *overrides):
        recipe = load_recipe(ROOT / "recipes" / "grpo_entropy.yaml",
                             [f"output_dir={tmp_path / name}", "max_steps=40", "logging_steps=1", "save_strategy=no",
                              "evaluation.num_prompts=200", *overrides])
        summary = run(recipe, log=lambda *a: None)
        logged = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r for r in logged if "loss" in r]

    plain, plain_log = go("b0", "entropy_coef=0")
    bonus, bonus_log = go("b1", "entropy_coef=1.0")
    assert plain["held_out_before"] == bonus["held_out_before"]
    # GRPO learns: held-out greedy reward (exact-match accuracy) goes up
    assert plain["held_out_after"]["reward"] > plain["held_out_before"]["reward"] + 0.02
    # Over the same 40 steps, the bonus keeps the policy's entropy above the β = 0 run
    mean_h = [sum(r["entropy"] for r in log[20:]) / len(log[20:]) for log in (plain_log, bonus_log)]
    assert mean_h[1] > mean_h[0] + 0.01, mean_h
    assert bonus["held_out_after"]["ref_entropy"] > plain["held_out_after"]["ref_entropy"]
    assert all(r["entropy_coef"] == 1.0 for r in bonus_log) and all(r["entropy_bonus"] > 0 for r in bonus_log)


def test_entropy_in_the_reward_is_alpha_times_the_sequence_entropy(default, tmp_path):
    """entropy_level="reward": one more reward function, α · Σ_t H_t of each completion, checked against the float64
    reference op on materialized logits; it enters TRL's reward sum (and so the group-normalized advantages)."""
    from llm_entreg.ops.reference import reference_token_stats

    alpha = 0.5
    trainer = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, default.load_model(), default, tmp_path,
                       entropy_level="reward", entropy_coef=alpha)
    assert trainer.reward_funcs[-1].__name__ == "entropy_reward" and len(trainer.reward_weights) == 2
    prompts = ["12+7=", "3+45="]
    completions = [[52, 54, 3], [52, 3]]  # byte tokens "02<eos>", "0<eos>" (arbitrary sampled tokens)
    got = trainer.reward_funcs[-1](prompts=prompts, completions=["", ""], completion_ids=completions)
    model = trainer.model.double()
    for prompt, completion, value in zip(prompts, completions, got):
        p = trainer.processing_class(text=prompt)["input_ids"]
        ids = torch.tensor([p + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
        h = reference_token_stats(logits, torch.tensor(completion), dtype=torch.float64).entropy
        assert value == pytest.approx(alpha * h.sum().item(), rel=1e-5)
    trainer.model.float()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer._metrics["train"]["rewards/entropy_reward/mean"][-1] > 0
