"""EntropyRLOOTrainer: entropy_coef = 0 reproduces TRL's RLOO loss and gradients; β > 0 adds exactly -β ∇ of the
token-mean entropy (float64 reference); the entropy in the reward enters the leave-one-out advantages; the exploration
recipe runs."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import RLOOConfig, RLOOTrainer

from llm_entreg.ops.reference import reference_token_stats
from llm_entreg.recipes import load_recipe
from llm_entreg.run import run
from llm_entreg.trainers import EntropyRLOOConfig, EntropyRLOOTrainer

from .grpo_helpers import generation_batch, loss_and_grads, rl_fields, rl_trainer


def _trainer(cls, config_cls, model, default, tmp_path, **kw):
    return rl_trainer(cls, config_cls, model, default, rl_fields(tmp_path, **{"beta": 0.05, **kw}))


def test_zero_coef_reproduces_trls_rloo_loss_and_gradients(default, tmp_path):
    model = default.load_model()
    ours = _trainer(EntropyRLOOTrainer, EntropyRLOOConfig, model, default, tmp_path, entropy_coef=0.0)
    theirs = _trainer(RLOOTrainer, RLOOConfig, model, default, tmp_path)
    inputs = generation_batch(ours)
    assert inputs["num_items_in_batch"] == inputs["completion_mask"].sum()  # one process: the batch's own count
    loss_o, grads_o = loss_and_grads(ours, inputs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-5)
    assert grads_o.keys() == grads_t.keys() and any(g.abs().max() > 0 for g in grads_t.values())
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)


def test_the_bonus_adds_minus_beta_times_the_token_mean_entropy_gradient(default, tmp_path):
    model = default.load_model().double()
    beta = 0.4
    ours = _trainer(EntropyRLOOTrainer, EntropyRLOOConfig, model, default, tmp_path, entropy_coef=beta)
    plain = _trainer(EntropyRLOOTrainer, EntropyRLOOConfig, model, default, tmp_path, entropy_coef=0.0)
    inputs = generation_batch(plain)
    _, grads_o = loss_and_grads(ours, inputs)
    _, grads_p = loss_and_grads(plain, inputs)
    ref = copy.deepcopy(model).train()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    logits = ref(input_ids=ids, attention_mask=attn).logits[:, -k - 1:-1]
    mask = inputs["completion_mask"].bool()
    entropy = reference_token_stats(logits, inputs["completion_ids"].masked_fill(~mask, -100),
                                    dtype=torch.float64).entropy
    (entropy[mask].sum() / mask.sum()).backward()
    for name, p in ref.named_parameters():
        expected = grads_p[name] - beta * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(grads_o[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    assert ours._metrics["train"]["entropy_bonus"][-1] > 0


def test_entropy_in_the_reward_enters_the_leave_one_out_advantages(default, tmp_path):
    trainer = _trainer(EntropyRLOOTrainer, EntropyRLOOConfig, default.load_model(), default, tmp_path,
                       entropy_level="reward", entropy_coef=0.5)
    assert trainer.reward_funcs[-1].__name__ == "entropy_reward" and len(trainer.reward_weights) == 2
    generation_batch(trainer)
    assert trainer._metrics["train"]["rewards/entropy_reward/mean"][-1] > 0


@pytest.mark.slow
def test_the_exploration_recipe_runs_on_rloo_and_raises_pass_at_1(tmp_path):
    recipe = load_recipe("rloo_entropy", [f"output_dir={tmp_path}", "max_steps=60", "evaluation.num_prompts=64",
                                          "evaluation.num_samples=8", "evaluation.curve_every=null"])
    summary = run(recipe, log=lambda *a: None)
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert after["pass_at_k"]["1"] > before["pass_at_k"]["1"] + 0.05
    assert summary["train"]["entropy_coef"]["last"] == pytest.approx(recipe["trainer"]["entropy_coef"])
