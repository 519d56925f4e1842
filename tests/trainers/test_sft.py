"""EntropySFTTrainer: entropy_coef = 0 reproduces TRL's SFT loss and gradients (plain, with LoRA, with packing);
β > 0 adds exactly -β ∇ of the token-mean entropy over the trained tokens (float64 reference); the term is
invariant to gradient accumulation; the entropy_mask column limits it to some examples."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from llm_entreg.ops.reference import reference_token_stats
from llm_entreg.tasks.data import build_datasets
from llm_entreg.tasks.model import build_tiny_model
from llm_entreg.tasks.tokenizer import build_tokenizer
from llm_entreg.trainers import EntropySFTConfig, EntropySFTTrainer

from .update_helpers import assert_same_update_that_moved


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    data = build_datasets(seed=0).sft["train"].select(range(32))
    return tok, data, build_tiny_model(tok, seed=0)


def _fields(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], save_strategy="no",
                use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, bf16=False, max_length=64)
    base.update(kw)
    return base


def _trainer(cls, config_cls, model, tok, data, tmp_path, peft_config=None, **kw):
    return cls(model=copy.deepcopy(model), args=config_cls(**_fields(tmp_path, **kw)), train_dataset=data,
               processing_class=tok, peft_config=peft_config)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _loss_and_grads(trainer, inputs, num_items=None):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_same(ours, theirs, inputs):
    loss_o, grads_o = _loss_and_grads(ours, inputs)
    loss_t, grads_t = _loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-6)
    assert grads_o.keys() == grads_t.keys() and grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)


def test_zero_coef_reproduces_trls_sft_loss_and_gradients(setup, tmp_path):
    tok, data, model = setup
    ours = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, entropy_coef=0.0)
    theirs = _trainer(SFTTrainer, SFTConfig, model, tok, data, tmp_path)
    _assert_same(ours, theirs, _batch(theirs))


def test_zero_coef_reproduces_trl_with_lora_and_with_packing(setup, tmp_path):
    from peft import LoraConfig

    tok, data, model = setup

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")

    ours = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, lora(), entropy_coef=0.0)
    theirs = _trainer(SFTTrainer, SFTConfig, model, tok, data, tmp_path, lora())
    _assert_same(ours, theirs, _batch(theirs))
    packed = dict(packing=True, max_length=48, per_device_train_batch_size=2)
    ours = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, entropy_coef=0.0, **packed)
    theirs = _trainer(SFTTrainer, SFTConfig, model, tok, data, tmp_path, **packed)
    _assert_same(ours, theirs, _batch(theirs))
    bonus = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, entropy_coef=0.5, max_steps=2,
                     **packed)
    bonus.train()
    assert all(r["entropy_bonus"] > 0 for r in bonus.state.log_history if "entropy_bonus" in r)


def _float64_entropy_grads(model64, inputs, rows=None):
    ref = copy.deepcopy(model64).train()
    logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1]
    mask = inputs["labels"][:, 1:] != -100
    if rows is not None:
        mask &= rows.bool().unsqueeze(1)
    entropy = reference_token_stats(logits, inputs["labels"][:, 1:].masked_fill(~mask, -100),
                                    dtype=torch.float64).entropy
    (entropy[mask].sum() / mask.sum()).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def test_the_confidence_penalty_is_minus_beta_grad_of_the_token_mean_entropy(setup, tmp_path):
    tok, data, model = setup
    model64 = copy.deepcopy(model).double()
    beta = 0.3
    ours = _trainer(EntropySFTTrainer, EntropySFTConfig, model64, tok, data, tmp_path, entropy_coef=beta)
    plain = _trainer(SFTTrainer, SFTConfig, model64, tok, data, tmp_path)
    inputs = _batch(plain)
    _, grads_o = _loss_and_grads(ours, inputs)
    _, grads_p = _loss_and_grads(plain, inputs)
    grads_h = _float64_entropy_grads(model64, inputs)
    for name, g in grads_o.items():
        expected = grads_p[name] - beta * (grads_h[name] if grads_h[name] is not None else torch.zeros_like(g))
        torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_the_entropy_mask_column_limits_the_term_to_the_flagged_examples(setup, tmp_path):
    tok, data, model = setup
    flags = [i % 2 for i in range(len(data))]
    flagged = data.add_column("entropy_mask", flags)
    model64 = copy.deepcopy(model).double()
    beta = 0.3
    ours = _trainer(EntropySFTTrainer, EntropySFTConfig, model64, tok, flagged, tmp_path, entropy_coef=beta)
    plain = _trainer(SFTTrainer, SFTConfig, model64, tok, data, tmp_path)
    inputs = _batch(ours)
    rows = inputs["entropy_mask"]
    assert set(rows.tolist()) == {0, 1}  # the flags of the shuffled batch, both kinds present
    _, grads_o = _loss_and_grads(ours, inputs)
    _, grads_p = _loss_and_grads(plain, {k: v for k, v in inputs.items() if k != "entropy_mask"})
    grads_h = _float64_entropy_grads(model64, inputs, rows)
    for name, g in grads_o.items():
        expected = grads_p[name] - beta * (grads_h[name] if grads_h[name] is not None else torch.zeros_like(g))
        torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="entropy_mask: a per-example entropy mask needs one example per row"):
        _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, flagged, tmp_path, packing=True, max_length=48)


def test_the_term_is_invariant_to_gradient_accumulation(setup, tmp_path):
    tok, data, model = setup
    data = data.select(range(4))
    kw = dict(entropy_coef=0.5, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0)
    one = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path / "a", **kw)
    two = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path / "b", per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, **kw)
    one.train()
    two.train()
    assert_same_update_that_moved(one, two, model)


def test_the_config_refuses_reward_level_entropy(tmp_path):
    with pytest.raises(ValueError, match="^entropy_level: 'reward' has no meaning in SFT"):
        EntropySFTConfig(**_fields(tmp_path), entropy_level="reward")


@pytest.mark.parametrize("kw", [dict(entropy_coef=0.0), dict(entropy_coef=0.3),
                                dict(entropy_coef=0.3, packing=True, max_length=48, per_device_train_batch_size=2)])
def test_the_loss_fused_path_equals_the_default_path(setup, tmp_path, monkeypatch, kw):
    from llm_entreg.ops import fused_loss as fused_module

    monkeypatch.setattr(fused_module, "token_chunk_for_budget", lambda *args: 7)  # several chunks per batch
    tok, data, model = setup
    fused = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, fused_loss=True, **kw)
    plain = _trainer(EntropySFTTrainer, EntropySFTConfig, model, tok, data, tmp_path, **kw)
    inputs = _batch(plain)
    n_items = (inputs["labels"][:, 1:] != -100).sum()
    for trainer in (fused, plain):
        trainer._metrics["train"].clear()
    loss_f, grads_f = _loss_and_grads(fused, inputs, n_items)
    loss_p, grads_p = _loss_and_grads(plain, inputs, n_items)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)
    for key, values in plain._metrics["train"].items():
        assert fused._metrics["train"][key][-1] == pytest.approx(values[-1], rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match="^loss_type: fused_loss=True supports only 'nll'"):
        EntropySFTConfig(**_fields(tmp_path, fused_loss=True, loss_type="dft"))
