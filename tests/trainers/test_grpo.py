"""EntropyGRPOTrainer: our bonus off = TRL's GRPO loss; ours on = TRL's own bonus at the same β (one source only);
a short run raises reward, and β > 0 keeps entropy above the β = 0 run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from llm_entreg.recipes import load_recipe
from llm_entreg.run import run
from llm_entreg.tasks import build_default
from llm_entreg.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default():
    return build_default(seed=0)


def _common(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        disable_tqdm=True, bf16=False, beta=0.04, seed=0, gradient_checkpointing=False, loss_type="dapo",
    )
    base.update(kw)
    return base


def _trainer(cls, config_cls, model, default, tmp_path, **kw):
    return cls(model=copy.deepcopy(model), reward_funcs=default.reward_funcs, args=config_cls(**_common(tmp_path, **kw)),
               train_dataset=default.prompts_train, processing_class=default.tokenizer)


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _generation_batch(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batches = iter(trainer.get_train_dataloader())
    for _ in range(10):  # a generation batch whose groups do not all share one reward (else no policy gradient)
        inputs = trainer._prepare_inputs(next(batches))
        if inputs["advantages"].abs().sum() > 0:
            return inputs
    raise AssertionError("no generation batch with a non-zero advantage")


@pytest.mark.parametrize("coef, top_q", [(0.0, 1.0), (0.3, 1.0), (0.3, 0.5)])
def test_matches_trl_grpo_with_the_same_entropy_coef(default, tmp_path, coef, top_q):
    """β = 0: TRL's GRPO loss exactly (on our fused head). β > 0: equal to TRL's own token-mean bonus at that β
    (single process, GA 1, where the two normalizations coincide) — so the term is applied once, not twice.
    top_q < 1: TRL's policy loss and bonus on its top-entropy tokens = ours with both quantiles set to q."""
    model = default.load_model()
    theirs = _trainer(GRPOTrainer, GRPOConfig, model, default, tmp_path, entropy_coef=coef, top_entropy_quantile=top_q)
    ours = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, entropy_coef=coef,
                    top_entropy_quantile=top_q, entropy_bonus_top_quantile=top_q)
    inputs = _generation_batch(theirs)
    loss_o, grads_o = _loss_and_grads(ours, inputs)
    loss_t, grads_t = _loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-5)
    assert grads_o.keys() == grads_t.keys()
    nonzero = 0
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)
        nonzero += int(grads_t[name].abs().max() > 0)
    assert nonzero > 0
    if coef:
        plain = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path, entropy_coef=0.0)
        _, grads_0 = _loss_and_grads(plain, inputs)
        assert any(not torch.allclose(grads_0[n], grads_o[n]) for n in grads_o)


def test_config_refuses_trl_adaptive_and_negative_coef(tmp_path):
    with pytest.raises(ValueError, match="^use_adaptive_entropy"):
        EntropyGRPOConfig(**_common(tmp_path), use_adaptive_entropy=True)
    with pytest.raises(ValueError, match="^entropy_coef"):
        EntropyGRPOConfig(**_common(tmp_path), entropy_coef=-1.0)


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
    trainer = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, default.load_model(), default, tmp_path,
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


@pytest.mark.parametrize("loss_type, coef, extra", [
    ("dapo", 0.0, {}),
    ("dapo", 0.3, {}),
    ("grpo", 0.3, {"delta": 1.5}),
    ("bnpo", 0.3, {"use_bias_correction_kl": True}),
    ("dr_grpo", 0.3, {"entropy_loss_agg_mode": "seq-mean-token-mean"}),
])
def test_fused_loss_matches_trl_loss_gradients_and_metrics(default, tmp_path, loss_type, coef, extra):
    """fused_loss=True (gradient formed in the head's forward) = TRL's GRPO loss + our bonus: same loss, same
    parameter gradients, same logged metrics, for every supported loss type (KL beta 0.04 on)."""
    model = default.load_model()
    ours_extra = {k: v for k, v in extra.items() if k.startswith("entropy_")}
    trl_extra = {k: v for k, v in extra.items() if not k.startswith("entropy_")}
    plain = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", loss_type=loss_type,
                     entropy_coef=coef, **extra)
    fused = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", loss_type=loss_type,
                     entropy_coef=coef, fused_loss=True, **extra)
    inputs = _generation_batch(plain)
    plain._metrics["train"].clear()  # keep only what the loss computation logs
    loss_p, grads_p = _loss_and_grads(plain, inputs)
    loss_f, grads_f = _loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    assert grads_f.keys() == grads_p.keys()
    assert {"kl", "entropy", "entropy_coef", "entropy_bonus"} <= plain._metrics["train"].keys()
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 0 for g in grads_p.values())
    for key, values in plain._metrics["train"].items():
        assert key in fused._metrics["train"], key
        torch.testing.assert_close(torch.tensor(fused._metrics["train"][key][-1]), torch.tensor(values[-1]),
                                   atol=1e-6, rtol=1e-5, msg=key)
    if coef == 0.0 and not ours_extra:  # and at beta = 0, TRL's own trainer
        theirs = _trainer(GRPOTrainer, GRPOConfig, model, default, tmp_path / "t", loss_type=loss_type, **trl_extra)
        loss_t, grads_t = _loss_and_grads(theirs, inputs)
        torch.testing.assert_close(loss_f, loss_t, atol=1e-6, rtol=1e-5)
        for name in grads_t:
            torch.testing.assert_close(grads_f[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_with_old_logprobs_and_reward_level_entropy(default, tmp_path):
    """num_iterations = 2 brings old per-token log-probs into the ratio; the entropy in the reward leaves the loss
    without an entropy term. Both paths agree."""
    model = default.load_model()
    kw = dict(num_iterations=2, entropy_coef=0.2, entropy_level="reward")
    plain = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", **kw)
    fused = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True, **kw)
    inputs = _generation_batch(plain)
    assert inputs.get("old_per_token_logps") is not None
    inputs = dict(inputs, old_per_token_logps=inputs["old_per_token_logps"] - 0.05)  # ratios away from 1: clipping
    loss_p, grads_p = _loss_and_grads(plain, inputs)
    loss_f, grads_f = _loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_chunk_budget_reaches_the_head(default, tmp_path, monkeypatch):
    """fused_loss_chunk_mib is handed to fused_linear_loss as chunk_budget_bytes; a bad value names the field."""
    import llm_entreg.ops as ops

    seen = []
    original = ops.fused_linear_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_budget_bytes"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_linear_loss", spy)  # install_fused_head imports it when the trainer is built
    model = default.load_model()
    fused = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True,
                     fused_loss_chunk_mib=3)
    _loss_and_grads(fused, _generation_batch(fused))
    assert seen and set(seen) == {3 * 2**20}
    with pytest.raises(ValueError, match="^fused_loss_chunk_mib: expected a positive"):
        EntropyGRPOConfig(**_common(tmp_path, fused_loss=True, fused_loss_chunk_mib=0))


@pytest.mark.parametrize("field, value", [
    ("loss_type", "cispo"),
    ("importance_sampling_level", "sequence"),
    ("top_entropy_quantile", 0.5),
    ("entropy_bonus_top_quantile", 0.5),
    ("off_policy_mask_threshold", 0.5),
])
def test_fused_loss_refuses_what_it_does_not_support(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}: fused_loss=True supports only"):
        EntropyGRPOConfig(**_common(tmp_path, fused_loss=True, **{field: value}))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_fused_loss_with_gradient_accumulation_and_in_eval(default, tmp_path, loss_type):
    """GA = 2 (the normalizers and the global entropy counts depend on it) and eval mode (no accumulation, no
    gradient): the fused path gives the default path's loss (and gradients)."""
    model = default.load_model()
    kw = dict(loss_type=loss_type, entropy_coef=0.3, gradient_accumulation_steps=2)
    plain = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", **kw)
    fused = _trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True, **kw)
    inputs = _generation_batch(plain)
    results = []
    for trainer in (plain, fused):
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.current_gradient_accumulation_steps = 2
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.model.eval()
        with torch.no_grad():
            eval_loss = trainer.compute_loss(trainer.model, inputs)
        results.append((loss.detach(), grads, eval_loss))
    (lp, gp, ep), (lf, gf, ef) = results
    torch.testing.assert_close(lf, lp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ef, ep, atol=1e-6, rtol=1e-5)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_refuses_peft_prompt_learning(default, tmp_path):
    """Virtual tokens shift the head's label grid: refused with a clear error, not silently misaligned."""
    from peft import PromptTuningConfig

    trainer = EntropyGRPOTrainer(
        model=default.load_model(), reward_funcs=default.reward_funcs,
        args=EntropyGRPOConfig(**_common(tmp_path, fused_loss=True)), train_dataset=default.prompts_train,
        processing_class=default.tokenizer, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.raises(ValueError, match="^fused_loss: PEFT prompt learning"):
        trainer.compute_loss(trainer.model, inputs)
