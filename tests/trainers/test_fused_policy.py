"""The loss-fused policy loss (``trainers/fused_policy.py``, ``fused_loss=True``) on EntropyGRPOTrainer: TRL's loss,
gradients and metrics for every supported loss type, with old log-probs, the entropy term or the entropy in the
reward, gradient accumulation and evaluation; the chunk budget reaches the head; unsupported settings are refused.
EntropyPPOTrainer's loss-fused path is checked in test_ppo.py."""

from __future__ import annotations

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from llm_entreg.trainers import EntropyGRPOConfig, EntropyGRPOTrainer

from .grpo_helpers import generation_batch, grpo_fields, grpo_trainer, loss_and_grads


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
    plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", loss_type=loss_type,
                     entropy_coef=coef, **extra)
    fused = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", loss_type=loss_type,
                     entropy_coef=coef, fused_loss=True, **extra)
    inputs = generation_batch(plain)
    plain._metrics["train"].clear()  # keep only what the loss computation logs
    loss_p, grads_p = loss_and_grads(plain, inputs)
    loss_f, grads_f = loss_and_grads(fused, inputs)
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
        theirs = grpo_trainer(GRPOTrainer, GRPOConfig, model, default, tmp_path / "t", loss_type=loss_type, **trl_extra)
        loss_t, grads_t = loss_and_grads(theirs, inputs)
        torch.testing.assert_close(loss_f, loss_t, atol=1e-6, rtol=1e-5)
        for name in grads_t:
            torch.testing.assert_close(grads_f[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_with_old_logprobs_and_reward_level_entropy(default, tmp_path):
    """num_iterations = 2 brings old per-token log-probs into the ratio; the entropy in the reward leaves the loss
    without an entropy term. Both paths agree."""
    model = default.load_model()
    kw = dict(num_iterations=2, entropy_coef=0.2, entropy_level="reward")
    plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", **kw)
    fused = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True, **kw)
    inputs = generation_batch(plain)
    assert inputs.get("old_per_token_logps") is not None
    inputs = dict(inputs, old_per_token_logps=inputs["old_per_token_logps"] - 0.05)  # ratios away from 1: clipping
    loss_p, grads_p = loss_and_grads(plain, inputs)
    loss_f, grads_f = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fused_loss_chunk_budget_reaches_the_head(default, tmp_path, monkeypatch):
    """fused_loss_chunk_mib is handed to fused_linear_loss as chunk_budget_bytes; a bad value names the field."""
    import llm_entreg.integrations.trl_head as trl_head

    seen = []
    original = trl_head.fused_linear_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("chunk_budget_bytes"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trl_head, "fused_linear_loss", spy)  # the fused head calls the op through this name
    model = default.load_model()
    fused = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True,
                     fused_loss_chunk_mib=3)
    loss_and_grads(fused, generation_batch(fused))
    assert seen and set(seen) == {3 * 2**20}
    with pytest.raises(ValueError, match="^fused_loss_chunk_mib: expected a positive"):
        EntropyGRPOConfig(**grpo_fields(tmp_path, fused_loss=True, fused_loss_chunk_mib=0))


@pytest.mark.parametrize("field, value", [
    ("loss_type", "cispo"),
    ("importance_sampling_level", "sequence"),
    ("top_entropy_quantile", 0.5),
    ("entropy_bonus_top_quantile", 0.5),
    ("off_policy_mask_threshold", 0.5),
])
def test_fused_loss_refuses_what_it_does_not_support(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}: fused_loss=True supports only"):
        EntropyGRPOConfig(**grpo_fields(tmp_path, fused_loss=True, **{field: value}))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_fused_loss_with_gradient_accumulation_and_in_eval(default, tmp_path, loss_type):
    """GA = 2 (the normalizers and the global entropy counts depend on it) and eval mode (no accumulation, no
    gradient): the fused path gives the default path's loss (and gradients)."""
    model = default.load_model()
    kw = dict(loss_type=loss_type, entropy_coef=0.3, gradient_accumulation_steps=2)
    plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", **kw)
    fused = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", fused_loss=True, **kw)
    inputs = generation_batch(plain)
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
        args=EntropyGRPOConfig(**grpo_fields(tmp_path, fused_loss=True)), train_dataset=default.prompts_train,
        processing_class=default.tokenizer, peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with pytest.raises(ValueError, match="^fused_loss: PEFT prompt learning"):
        trainer.compute_loss(trainer.model, inputs)


def test_one_process_accumulates_the_head_gradient_into_its_own_grad(default, tmp_path, monkeypatch):
    """One process, fp32 weights: the op writes the head's gradient straight into ``weight.grad`` (no second
    ``[V, d]`` buffer), on top of what is there, and the result equals the default path's."""
    from llm_entreg.integrations import trl_head

    model = default.load_model()
    plain = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "p", entropy_coef=0.3)
    fused = grpo_trainer(EntropyGRPOTrainer, EntropyGRPOConfig, model, default, tmp_path / "f", entropy_coef=0.3,
                         fused_loss=True)
    inputs = generation_batch(plain)
    seen = []
    original = trl_head.fused_linear_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight_grad"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trl_head, "fused_linear_loss", spy)
    _, grads_p = loss_and_grads(plain, inputs)
    fused.model.train()
    fused.model.zero_grad()
    head = fused.model.get_output_embeddings().weight
    fused.current_gradient_accumulation_steps = 1
    head.grad = torch.ones_like(head)  # an earlier micro-batch's gradient
    fused.compute_loss(fused.model, inputs).backward()
    assert seen and seen[-1] is head.grad
    name = next(n for n, p in fused.model.named_parameters() if p is head)
    torch.testing.assert_close(head.grad - 1, grads_p[name], atol=1e-6, rtol=1e-4)
