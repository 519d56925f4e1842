"""The loss-fused DPO path (``trainers/fused_dpo.py``, ``fused_loss=True``): the same loss, gradients and logged
metrics as the unfused EntropyDPOTrainer (and TRL's DPOTrainer at β = 0) for sigmoid, hinge and ipo, with H-DPO's α,
the entropy bonus, small chunks of whole pairs, gradient accumulation, LoRA and precomputed reference log-probs."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from llm_entreg.ops import fused_loss as fused_module
from llm_entreg.tasks.data import build_datasets
from llm_entreg.tasks.model import build_tiny_model
from llm_entreg.tasks.tokenizer import build_tokenizer
from llm_entreg.trainers import EntropyDPOConfig, EntropyDPOTrainer


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    return tok, build_datasets(seed=0, n_preference=32).preference["train"], build_tiny_model(tok, seed=0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of at most 7 tokens: every pair (two completions) is longer, so a chunk never splits one."""
    monkeypatch.setattr(fused_module, "token_chunk_for_budget", lambda *args: 7)


def _fields(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], save_strategy="no",
                use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, bf16=False)
    base.update(kw)
    return base


def _trainer(model, tok, data, tmp_path, cls=EntropyDPOTrainer, config_cls=EntropyDPOConfig, peft_config=None, **kw):
    ref = None if peft_config is not None or kw.get("precompute_ref_log_probs") else copy.deepcopy(model)
    return cls(model=copy.deepcopy(model), ref_model=ref, args=config_cls(**_fields(tmp_path, **kw)),
               train_dataset=data, processing_class=tok, peft_config=peft_config)


def _run(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_same(a, b, tol=1e-5):
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys() and grads_b
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=1e-4, msg=name)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_b:
        if key == "rewards/accuracies" and abs(metrics_b["rewards/margins"]) < 1e-4:
            continue  # policy = reference: every reward is 0 up to float rounding, and "> 0" counts the rounding
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("kw", [
    dict(entropy_coef=0.0),
    dict(entropy_coef=0.3),
    dict(entropy_coef=0.3, entropy_on="chosen", hdpo_alpha=0.9),
    dict(entropy_coef=0.2, loss_type=["hinge", "ipo"], loss_weights=[1.0, 0.5]),
    dict(entropy_coef=0.2, entropy_level="sequence", entropy_loss_agg_mode="seq-mean-token-sum"),
])
def test_fused_equals_the_unfused_path_loss_gradients_and_metrics(setup, tmp_path, small_chunks, kw):
    tok, data, model = setup
    fused = _trainer(model, tok, data, tmp_path, fused_loss=True, **kw)
    plain = _trainer(model, tok, data, tmp_path, **kw)
    inputs = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    _assert_same(_run(fused, inputs), _run(plain, inputs))
    if kw == dict(entropy_coef=0.0):  # and TRL's own DPOTrainer
        theirs = _trainer(model, tok, data, tmp_path, cls=DPOTrainer, config_cls=DPOConfig)
        loss_t, grads_t, _ = _run(theirs, inputs)
        loss_f, grads_f, _ = _run(fused, inputs)
        torch.testing.assert_close(loss_f, loss_t, atol=1e-5, rtol=1e-5)
        for name in grads_t:
            torch.testing.assert_close(grads_f[name], grads_t[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_with_lora_and_with_precomputed_reference(setup, tmp_path, small_chunks):
    from peft import LoraConfig

    tok, data, model = setup

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")

    fused = _trainer(model, tok, data, tmp_path, peft_config=lora(), fused_loss=True, entropy_coef=0.2)
    plain = _trainer(model, tok, data, tmp_path, peft_config=lora(), entropy_coef=0.2)
    inputs = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    _assert_same(_run(fused, inputs), _run(plain, inputs))
    fused = _trainer(model, tok, data, tmp_path, precompute_ref_log_probs=True, fused_loss=True, entropy_coef=0.2)
    plain = _trainer(model, tok, data, tmp_path, precompute_ref_log_probs=True, entropy_coef=0.2)
    inputs = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    _assert_same(_run(fused, inputs), _run(plain, inputs))


def test_fused_training_with_gradient_accumulation_matches(setup, tmp_path, small_chunks):
    tok, data, model = setup
    kw = dict(entropy_coef=0.5, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    fused = _trainer(model, tok, data, tmp_path / "f", fused_loss=True, **kw)
    plain = _trainer(model, tok, data, tmp_path / "p", **kw)
    fused.train()
    plain.train()
    for (name, a), (_, b) in zip(fused.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
    logged = [r for r in fused.state.log_history if "loss" in r]
    reference = [r for r in plain.state.log_history if "loss" in r]
    for key in ("loss", "rewards/margins", "entropy", "entropy_bonus", "logps/chosen"):
        assert logged[-1][key] == pytest.approx(reference[-1][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("field, value", [("loss_type", ["robust"]), ("ld_alpha", 0.5), ("use_weighting", True),
                                          ("entropy_clamp_top_p", 0.9)])
def test_unsupported_settings_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}: fused_loss=True supports only"):
        EntropyDPOConfig(**_fields(tmp_path, fused_loss=True, **{field: value}))
