"""EntropyPPOTrainer: rollout plumbing (score at the last token, KL in the reward, GAE), critic checks, empty completions,
entropy in the reward, checkpoints, and a short seeded run that raises reward while the bonus keeps entropy up."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

from llm_entreg.recipes import load_recipe
from llm_entreg.regularizers import kl_penalty
from llm_entreg.losses import gae, token_rewards
from llm_entreg.run import run
from llm_entreg.trainers import EntropyPPOConfig, EntropyPPOTrainer
from llm_entreg.trainers.critic import VALUE_STATE_FILE

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=2,
        max_completion_length=8, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
        bf16=False, seed=0, gradient_checkpointing=False, learning_rate=5e-5, whiten_advantages=False,
    )
    base.update(kw)
    return EntropyPPOConfig(**base)


def _trainer(default, tmp_path, value_model=None, **kw):
    return EntropyPPOTrainer(model=default.load_model(), reward_funcs=default.reward_funcs, args=_config(tmp_path, **kw),
                             train_dataset=default.prompts_train, processing_class=default.tokenizer,
                             value_model=value_model)


def test_rollout_puts_score_at_last_token_kl_in_reward_and_gae(default, tmp_path):
    trainer = _trainer(default, tmp_path, kl_coef=0.1, gamma=0.9, lam=0.8)
    trainer.model.train()
    out = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    mask = out["completion_mask"].bool()
    assert out["advantages"].shape == mask.shape == out["returns"].shape == out["old_values"].shape
    # The critic starts with a zero head: V = 0, so returns are the discounted reward-to-go
    assert torch.equal(out["old_values"], torch.zeros_like(out["old_values"]))
    kl = kl_penalty(out["old_per_token_logps"], out["ref_per_token_logps"], "k1").masked_fill(~mask, 0)
    scores = trainer._ppo_rewards_per_func[:, 0]  # correctness only, one process
    rewards = token_rewards(scores, mask, kl_per_token=kl, kl_coef=0.1)
    last = mask.long().cumsum(1).argmax(1)
    for b in range(mask.shape[0]):  # score on the last real token, -0.1·KL_t everywhere on the completion
        expected = -0.1 * kl[b]
        expected[last[b]] += scores[b]
        torch.testing.assert_close(rewards[b][mask[b]], expected[mask[b]])
    adv, ret = gae(rewards, out["old_values"], mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(out["advantages"], adv)
    torch.testing.assert_close(out["returns"], ret)
    # Hand check on one row: with V = 0, returns_t = sum_k (γλ)^k r_{t+k}... (γλ = 0.72 for the advantages,
    # and with V = 0 the return is advantages + V = advantages)
    row = mask[0].nonzero().squeeze(1)
    r = rewards[0, row].tolist()
    acc, hand = 0.0, []
    for x in reversed(r):
        acc = x + 0.72 * acc
        hand.append(acc)
    torch.testing.assert_close(out["advantages"][0, row], torch.tensor(hand[::-1]), atol=1e-6, rtol=1e-5)


def test_wrong_value_heads_are_refused(default, tmp_path):
    cfg = AutoConfig.from_pretrained(default.model_path)
    seq = AutoModelForSequenceClassification.from_config(copy.deepcopy(cfg))
    with pytest.raises(ValueError, match="^value_model: .*one value per sequence"):
        _trainer(default, tmp_path, value_model=seq)
    cfg2 = copy.deepcopy(cfg)
    cfg2.num_labels = 3
    tok = AutoModelForTokenClassification.from_config(cfg2)
    with pytest.raises(ValueError, match="^value_model: .*num_labels=1"):
        _trainer(default, tmp_path, value_model=tok)
    with pytest.raises(ValueError, match="^kl_in"):
        _config(tmp_path, kl_in="advantage")
    with pytest.raises(ValueError, match="^beta"):
        _config(tmp_path, beta=0.3)


def test_token_classification_critic_and_empty_completions_give_no_nan(default, tmp_path):
    cfg = AutoConfig.from_pretrained(default.model_path)
    cfg.num_labels = 1
    critic = AutoModelForTokenClassification.from_config(cfg)
    # Every completion is cut at 1 token and masked as truncated: all completion masks are empty
    trainer = _trainer(default, tmp_path, value_model=critic, max_completion_length=1,
                       mask_truncated_completions=True, entropy_coef=0.1, max_steps=2)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all(math.isfinite(r["loss"]) and math.isfinite(r["value_loss"]) for r in logged)


def test_entropy_in_the_reward_flows_into_returns(default, tmp_path):
    alpha = 0.5
    trainer = _trainer(default, tmp_path, entropy_level="reward", entropy_coef=alpha, kl_coef=0.0, gamma=1.0, lam=1.0)
    trainer.model.train()
    out = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    mask = out["completion_mask"].bool()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        _, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attn, mask.shape[1], compute_entropy=True)
    scores = trainer._ppo_rewards_per_func[:, 0]
    # V = 0 (zero-initialised head), γ = λ = 1: the return is the plain reward-to-go of score + α·H_t
    bonus = (alpha * entropy).masked_fill(~mask, 0)
    expected = token_rewards(scores, mask) + bonus
    expected = expected.flip(1).cumsum(1).flip(1).masked_fill(~mask, 0)
    torch.testing.assert_close(out["returns"], expected, atol=1e-5, rtol=1e-5)
    assert (bonus[mask] > 0).all()


def test_checkpoint_holds_critic_and_kl_controller(default, tmp_path):
    trainer = _trainer(default, tmp_path, save_strategy="steps", save_steps=2, target_kl=1.0, kl_coef=0.05)
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-2" / VALUE_STATE_FILE, weights_only=False)
    assert set(state) == {"value_model", "value_optimizer", "kl_controller"}
    assert state["kl_controller"]["value"] != 0.05  # the adaptive controller moved
    resumed = _trainer(default, tmp_path, save_strategy="no", target_kl=1.0, kl_coef=0.05, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
    (tmp_path / "checkpoint-2" / VALUE_STATE_FILE).write_bytes(b"garbage")
    again = _trainer(default, tmp_path, save_strategy="no", target_kl=1.0, kl_coef=0.05, max_steps=3)
    with pytest.raises(ValueError, match=VALUE_STATE_FILE + ": 7 bytes, the checkpoint recorded"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.slow
def test_ppo_run_raises_reward_and_bonus_keeps_entropy_higher(tmp_path):
    def go(name, *overrides):
        recipe = load_recipe(ROOT / "recipes" / "ppo_rlhf.yaml", [
            f"output_dir={tmp_path / name}", "max_steps=40", "logging_steps=1", "save_strategy=no",
            "rewards.reward_model=null", "rewards.funcs=[correctness]", *overrides])
        summary = run(recipe, log=lambda *a: None)
        logged = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r for r in logged if "loss" in r]

    plain, plain_log = go("b0", "entropy_coef=0")
    bonus, bonus_log = go("b1", "entropy_coef=1.0")
    assert plain["held_out_after"]["reward"] > plain["held_out_before"]["reward"] + 0.02
    mean_h = [sum(r["entropy"] for r in log[20:]) / len(log[20:]) for log in (plain_log, bonus_log)]
    assert mean_h[1] > mean_h[0] + 0.01, mean_h
    assert bonus["held_out_after"]["ref_entropy"] > plain["held_out_after"]["ref_entropy"]
    assert plain_log[-1]["explained_variance"] > plain_log[0]["explained_variance"]  # the critic learns


def test_controller_moves_with_entropy_in_the_reward(default, tmp_path):
    """At the reward level the bonus enters the rewards, yet the measured entropy still drives the controller."""
    trainer = _trainer(default, tmp_path, entropy_level="reward", entropy_controller="target_entropy",
                       entropy_target=5.0, entropy_coef=0.02, entropy_coef_delta=0.01, max_steps=3)
    trainer.train()
    assert trainer.entropy_coefficient.coef == pytest.approx(0.05)  # below a 5-nat target: +0.01 per step
    coefs = [r["entropy_coef"] for r in trainer.state.log_history if "entropy_coef" in r]
    assert coefs[0] == 0.0 and coefs[-1] == pytest.approx(0.04)


@pytest.mark.parametrize("kl_in, level", [("reward", "token"), ("loss", "token"), ("reward", "reward")])
def test_fused_loss_matches_the_default_path(default, tmp_path, kl_in, level):
    """fused_loss=True: the policy loss, KL (in the loss or not) and entropy term with the gradient formed in the
    head's forward give the default path's loss, policy gradients, critic gradients and logged metrics."""
    kw = dict(kl_coef=0.1, kl_in=kl_in, entropy_coef=0.3, entropy_level=level, num_iterations=2)
    plain = _trainer(default, tmp_path / "p", **kw)
    fused = _trainer(default, tmp_path / "f", fused_loss=True, **kw)
    plain.model.train()
    inputs = plain._generate_and_score_completions(next(iter(plain.get_train_dataloader())))
    inputs = dict(inputs, old_per_token_logps=inputs["old_per_token_logps"] - 0.05)  # ratios away from 1
    results = []
    for trainer in (plain, fused):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        trainer._generation_window_counts(inputs, inputs["completion_mask"].bool())
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        trainer.critic.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        vgrads = {n: p.grad.clone() for n, p in trainer.critic.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, vgrads, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (lp, gp, vp, mp), (lf, gf, vf, mf) = results
    torch.testing.assert_close(lf, lp, atol=1e-6, rtol=1e-5)
    assert gf.keys() == gp.keys() and vf.keys() == vp.keys() and any(g.abs().max() > 0 for g in gp.values())
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], atol=1e-6, rtol=1e-4, msg=name)
    for name in vp:
        torch.testing.assert_close(vf[name], vp[name], atol=1e-6, rtol=1e-4, msg=name)
    assert mf.keys() == mp.keys() and {"entropy", "value_loss", "entropy_bonus"} <= mp.keys()
    assert ("kl" in mp) == (kl_in == "loss")  # TRL logs its k3 KL only when it is in the loss
    for key in mp:
        torch.testing.assert_close(torch.tensor(mf[key]), torch.tensor(mp[key]), atol=1e-6, rtol=1e-5, msg=key)
