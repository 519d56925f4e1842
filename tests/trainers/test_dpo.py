"""EntropyDPOTrainer: β = 0 reproduces TRL's DPOTrainer; β > 0 adds exactly -β ∇ agg(H); β is GA-invariant."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from llm_entreg.ops.reference import reference_token_stats
from llm_entreg.tasks.data import build_datasets
from llm_entreg.tasks.model import build_tiny_model
from llm_entreg.tasks.tokenizer import build_tokenizer
from llm_entreg.trainers import EntropyDPOConfig, EntropyDPOTrainer

from .update_helpers import assert_same_update_that_moved


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    data = build_datasets(seed=0, n_preference=32).preference["train"]
    model = build_tiny_model(tok, seed=0)
    return tok, data, model


def _common(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, bf16=False,
    )
    base.update(kw)
    return base


def _trainer(cls, config_cls, model, tok, data, tmp_path, **kw):
    return cls(
        model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=config_cls(**_common(tmp_path, **kw)),
        train_dataset=data, processing_class=tok,
    )


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_beta_zero_reproduces_trl_loss_and_gradients(setup, tmp_path):
    tok, data, model = setup
    ours = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model, tok, data, tmp_path, entropy_coef=0.0)
    theirs = _trainer(DPOTrainer, DPOConfig, model, tok, data, tmp_path)
    inputs = _first_batch(theirs)
    loss_o, grads_o = _loss_and_grads(ours, inputs)
    loss_t, grads_t = _loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-6)
    assert grads_o.keys() == grads_t.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)


def _float64_policy_logits(model64, inputs):
    """An independent float64 copy of the policy, its materialized next-token logits and the completion mask."""
    ref = copy.deepcopy(model64).train()
    logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    return ref, logits, inputs["completion_mask"][:, 1:].bool()


@pytest.mark.parametrize("entropy_on", ["both", "chosen"])
def test_gradient_is_dpo_gradient_minus_beta_grad_entropy_float64(setup, tmp_path, entropy_on):
    tok, data, model = setup
    model64 = copy.deepcopy(model).double()
    beta = 0.3
    ours = _trainer(
        EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=beta, entropy_on=entropy_on
    )
    plain = _trainer(DPOTrainer, DPOConfig, model64, tok, data, tmp_path)
    inputs = _first_batch(plain)
    _, grads_o = _loss_and_grads(ours, inputs)
    _, grads_dpo = _loss_and_grads(plain, inputs)

    # Independent float64 entropy term: materialized logits, reference op, token-mean over the chosen tokens
    ref, logits, mask = _float64_policy_logits(model64, inputs)
    if entropy_on == "chosen":
        mask[mask.shape[0] // 2:] = False
    targets = inputs["input_ids"][:, 1:].masked_fill(~mask, -100)
    entropy = reference_token_stats(logits, targets, dtype=torch.float64).entropy
    (entropy[mask].sum() / mask.sum()).backward()
    grads_h = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for name, g in grads_o.items():
        expected = grads_dpo[name] - beta * grads_h.get(name, torch.zeros_like(g))
        torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_entropy_term_is_invariant_to_gradient_accumulation(setup, tmp_path):
    """bs 4 x GA 1 and bs 2 x GA 2 see the same 4 pairs: with a global token count the update is the same."""
    tok, _, model = setup
    # Completion lengths differ a lot between pairs, so the two micro-batches hold different token counts
    # (with per-micro-batch normalization the two runs would then differ)
    lengths = [1, 9, 2, 7, 3, 8, 1, 6]
    data = Dataset.from_dict({
        "prompt": ["12+7=" for _ in lengths],
        "chosen": ["19" * k for k in lengths],
        "rejected": ["18" * (k + 1) for k in lengths],
    })
    kw = dict(entropy_coef=0.5, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
              beta=0.1)
    one = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model, tok, data, tmp_path / "a", **kw)
    two = _trainer(
        EntropyDPOTrainer, EntropyDPOConfig, model, tok, data, tmp_path / "b", per_device_train_batch_size=2,
        gradient_accumulation_steps=2, **kw,
    )
    one.train()
    two.train()
    assert_same_update_that_moved(one, two, model)


def test_config_rejects_bad_values_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="entropy_on"):
        EntropyDPOConfig(**_common(tmp_path), entropy_on="prompt")
    with pytest.raises(ValueError, match="entropy_coef"):
        EntropyDPOConfig(**_common(tmp_path), entropy_coef=-0.1)
    EntropyDPOConfig(**_common(tmp_path), entropy_coef=-0.1, allow_entropy_minimization=True)
    with pytest.raises(ValueError, match="entropy_level"):
        EntropyDPOConfig(**_common(tmp_path), entropy_level="reward")
    with pytest.raises(ValueError, match="fused_head_backend"):
        EntropyDPOConfig(**_common(tmp_path), fused_head_backend="cuda")
    with pytest.raises(ValueError, match="^entropy_controller"):
        EntropyDPOConfig(**_common(tmp_path), entropy_controller="pid")
    # The regularizers' own parameter names are translated to the config fields a user sets
    with pytest.raises(ValueError, match="^entropy_loss_agg_mode"):
        EntropyDPOConfig(**_common(tmp_path), entropy_loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="^entropy_bonus_top_quantile"):
        EntropyDPOConfig(**_common(tmp_path), entropy_bonus_top_quantile=1.5)
    with pytest.raises(ValueError, match="^entropy_warmup_steps"):
        EntropyDPOConfig(**_common(tmp_path), entropy_schedule="linear", entropy_coef=0.1, entropy_warmup_steps=5)
    with pytest.raises(ValueError, match="^entropy_schedule_steps"):
        EntropyDPOConfig(**_common(tmp_path, max_steps=-1), entropy_schedule="cosine", entropy_coef=0.1)
    with pytest.raises(ValueError, match="^entropy_target_ratio"):
        EntropyDPOConfig(**_common(tmp_path), entropy_controller="learned_alpha", entropy_coef=1e-3,
                         entropy_target=0.3, entropy_target_ratio=0.5)


def test_lora_reference_is_the_adapter_free_model(setup, tmp_path):
    """With PEFT, TRL's reference is the model with adapters disabled: β = 0 equals TRL, β > 0 trains only LoRA."""
    from peft import LoraConfig

    tok, data, model = setup

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")

    def make(cls, config_cls, **kw):
        return cls(model=copy.deepcopy(model), args=config_cls(**_common(tmp_path, **kw)), train_dataset=data,
                   processing_class=tok, peft_config=lora())

    ours, theirs = make(EntropyDPOTrainer, EntropyDPOConfig, entropy_coef=0.0), make(DPOTrainer, DPOConfig)
    assert ours.ref_model is None and theirs.ref_model is None
    inputs = _first_batch(theirs)
    loss_o, grads_o = _loss_and_grads(ours, inputs)
    loss_t, grads_t = _loss_and_grads(theirs, inputs)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-6, rtol=1e-6)
    assert grads_o.keys() == grads_t.keys() and all("lora" in n for n in grads_o)
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], atol=1e-6, rtol=1e-4, msg=name)

    bonus = make(EntropyDPOTrainer, EntropyDPOConfig, entropy_coef=0.5, max_steps=2, learning_rate=1e-2)
    frozen = {n: p.detach().clone() for n, p in bonus.model.named_parameters() if "lora" not in n}
    bonus.train()
    logged = [r for r in bonus.state.log_history if "entropy_bonus" in r]
    assert logged and all(math.isfinite(r["loss"]) and r["entropy_bonus"] > 0 for r in logged)
    for n, p in bonus.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_precomputed_reference_log_probs(setup, tmp_path):
    """precompute_ref_log_probs=True: the reference pass runs before training; the bonus still sees the policy."""
    tok, data, model = setup
    ours = EntropyDPOTrainer(
        model=copy.deepcopy(model), args=EntropyDPOConfig(**_common(tmp_path, entropy_coef=0.2,
                                                                    precompute_ref_log_probs=True, max_steps=2)),
        train_dataset=data, processing_class=tok,
    )
    assert ours.ref_model is None and "ref_chosen_logps" in ours.train_dataset.column_names
    assert ours._entropy_captured == []  # the precomputation's outputs were not kept
    inputs = _first_batch(ours)
    _, grads = _loss_and_grads(ours, inputs)
    plain = EntropyDPOTrainer(
        model=copy.deepcopy(model), args=EntropyDPOConfig(**_common(tmp_path, entropy_coef=0.0,
                                                                    precompute_ref_log_probs=True, max_steps=2)),
        train_dataset=data, processing_class=tok,
    )
    _, grads0 = _loss_and_grads(plain, inputs)
    assert any(not torch.allclose(grads[n], grads0[n]) for n in grads)  # the bonus changed the gradient
    ours.train()
    assert all(math.isfinite(r["loss"]) for r in ours.state.log_history if "loss" in r)


def test_bf16_autocast_head_outputs_are_fp32_exact(setup, tmp_path):
    """TRL's configs default to bf16=True: on the CPU the trainer's accelerator then autocasts to bf16. Our head takes
    bf16 operands but keeps fp32 logits, so its per-token outputs (entropy and WPO's log_sum_sq_probs included)
    equal the float64 statistics of those operands within fp32 tolerance; one training step runs."""
    from llm_entreg.ops.reference import reference_linear_token_stats

    tok, data, model = setup
    trainer = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model, tok, data, tmp_path, bf16=True, entropy_coef=0.1,
                       use_weighting=True)
    batch = _first_batch(trainer)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1) if "prompt_ids" in batch else \
        batch["input_ids"]
    labels = input_ids.clone()
    hidden = []
    handle = trainer.model.base_model.register_forward_hook(lambda m, a, out: hidden.append(out.last_hidden_state))
    with trainer.accelerator.autocast():
        out = trainer.model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    handle.remove()
    assert torch.is_autocast_enabled("cpu") is False and out.entropy.dtype == torch.float32
    h = hidden[0][:, :-1].reshape(-1, hidden[0].shape[-1]).to(torch.bfloat16).double()
    w = trainer.model.get_output_embeddings().weight.detach().to(torch.bfloat16).double()
    ref = reference_linear_token_stats(h, w, labels[:, 1:].reshape(-1), dtype=torch.float64,
                                       extras=("log_sum_sq_probs",))
    for field, ref_field in (("log_probs", "logprobs"), ("entropy", "entropy"), ("log_sum_sq_probs", "log_sum_sq_probs")):
        got = getattr(out, field).reshape(-1).detach().double()
        torch.testing.assert_close(got, getattr(ref, ref_field), atol=3e-5, rtol=3e-5, msg=field)
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


def _hand_hdpo_loss(model64, ref64, inputs, alpha, beta):
    """H-DPO's loss from materialized float64 logits: -log σ(β[(α lp_w - ref_w) - (α lp_l - ref_l)]), batch mean."""
    mask = inputs["completion_mask"][:, 1:].bool()
    targets = inputs["input_ids"][:, 1:].masked_fill(~mask, -100)

    def seq_logps(model):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        return reference_token_stats(logits, targets, dtype=torch.float64).logprobs.sum(1)

    with torch.no_grad():
        ref = seq_logps(ref64)
    pol = seq_logps(model64)
    ref_w, ref_l = ref.chunk(2)
    pol_w, pol_l = pol.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((alpha * pol_w - ref_w) - (alpha * pol_l - ref_l))).mean()


@pytest.mark.parametrize("alpha", [0.9, 1.3])
def test_hdpo_matches_the_papers_loss_by_hand_in_float64(setup, tmp_path, alpha):
    tok, data, model = setup
    model64 = copy.deepcopy(model).double()
    ours = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=0.0,
                    hdpo_alpha=alpha, beta=0.2)
    inputs = _first_batch(ours)
    loss, grads = _loss_and_grads(ours, inputs)
    by_hand = copy.deepcopy(model64).train()
    expected = _hand_hdpo_loss(by_hand, copy.deepcopy(model64), inputs, alpha, 0.2)
    expected.backward()
    # the fused head's log-probs are float32 (the op's contract), the rest of the model float64
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=1e-6)
    for name, p in by_hand.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    plain = _trainer(DPOTrainer, DPOConfig, model64, tok, data, tmp_path, beta=0.2)
    loss_dpo, _ = _loss_and_grads(plain, inputs)
    assert not torch.allclose(loss, loss_dpo)  # α != 1 really changes the loss
    logged = ours._metrics["train"]
    assert logged["logps/chosen"][-1] == pytest.approx(plain._metrics["train"]["logps/chosen"][-1], rel=1e-6)


def test_hdpo_composes_with_the_entropy_bonus_lora_and_precomputed_reference(setup, tmp_path):
    from peft import LoraConfig

    tok, data, model = setup
    model64 = copy.deepcopy(model).double()
    both = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=0.3,
                    hdpo_alpha=0.9)
    hdpo = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=0.0,
                    hdpo_alpha=0.9)
    bonus = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=0.3)
    plain = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=0.0)
    inputs = _first_batch(plain)
    (lb, gb), (lh, gh), (le, ge), (lp, gp) = (_loss_and_grads(t, inputs) for t in (both, hdpo, bonus, plain))
    torch.testing.assert_close(lb - lh, le - lp, atol=1e-6, rtol=1e-6)  # the two terms add
    for name in gp:
        torch.testing.assert_close(gb[name] - gh[name], ge[name] - gp[name], atol=1e-6, rtol=1e-5, msg=name)

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_trainer = EntropyDPOTrainer(model=copy.deepcopy(model), processing_class=tok, train_dataset=data,
                                     args=EntropyDPOConfig(**_common(tmp_path, hdpo_alpha=0.5)), peft_config=lora)
    peft_inputs = _first_batch(peft_trainer)
    loss, _ = _loss_and_grads(peft_trainer, peft_inputs)
    base = peft_trainer.accelerator.unwrap_model(peft_trainer.model)
    with base.disable_adapter():  # the reference pass must not be scaled: at init LoRA is the identity
        same = _hand_hdpo_loss(base, base, peft_inputs, 0.5, 0.1)
    torch.testing.assert_close(loss.double(), same.detach(), atol=1e-5, rtol=1e-5)

    pre = EntropyDPOTrainer(model=copy.deepcopy(model), processing_class=tok, train_dataset=data,
                            args=EntropyDPOConfig(**_common(tmp_path, hdpo_alpha=0.5, precompute_ref_log_probs=True)))
    pre_inputs = _first_batch(pre)
    loss_pre, _ = _loss_and_grads(pre, pre_inputs)
    expected = _hand_hdpo_loss(copy.deepcopy(model).double(), copy.deepcopy(model).double(),
                               {k: v for k, v in pre_inputs.items()}, 0.5, 0.1)
    torch.testing.assert_close(loss_pre.double(), expected.detach(), atol=1e-5, rtol=1e-5)


def test_hdpo_refuses_what_it_cannot_compose_with(tmp_path):
    with pytest.raises(ValueError, match="hdpo_alpha: expected a number > 0"):
        EntropyDPOConfig(**_common(tmp_path), hdpo_alpha=0.0)
    with pytest.raises(ValueError, match="hdpo_alpha: H-DPO scales the policy log-probs"):
        EntropyDPOConfig(**_common(tmp_path), hdpo_alpha=0.9, loss_type=["sigmoid", "sft"])
    EntropyDPOConfig(**_common(tmp_path), hdpo_alpha=1.0, loss_type=["sigmoid", "sft"])


def test_a_clamped_bonus_is_minus_beta_grad_of_the_clamped_entropy_float64(setup, tmp_path):
    """entropy_clamp_top_p / _top_k: the bonus (and the logged entropy) is the clamped one; TRL's DPO part is
    untouched and the reference model's head is not clamped."""
    from llm_entreg.ops.reference import reference_clamped_entropy

    tok, data, model = setup
    model64 = copy.deepcopy(model).double()
    beta = 0.3
    ours = _trainer(EntropyDPOTrainer, EntropyDPOConfig, model64, tok, data, tmp_path, entropy_coef=beta,
                    entropy_clamp_top_p=0.8, entropy_clamp_top_k=50)
    plain = _trainer(DPOTrainer, DPOConfig, model64, tok, data, tmp_path)
    assert ours.ref_model._llm_entreg_fused_head["entropy_clamp"] == (None, None)
    inputs = _first_batch(plain)
    _, grads_o = _loss_and_grads(ours, inputs)
    _, grads_dpo = _loss_and_grads(plain, inputs)
    ref, logits, mask = _float64_policy_logits(model64, inputs)
    targets = inputs["input_ids"][:, 1:].masked_fill(~mask, -100)
    clamped = reference_clamped_entropy(logits, targets, top_p=0.8, top_k=50, dtype=torch.float64)
    full = reference_token_stats(logits, targets, dtype=torch.float64).entropy
    assert (clamped[mask] < full[mask] - 1e-3).any()  # the clamp really cuts something
    (clamped[mask].sum() / mask.sum()).backward()
    for name, p in ref.named_parameters():
        expected = grads_dpo[name] - beta * (p.grad if p.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(grads_o[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    logged = ours._metrics["train"]["entropy"][-1]
    assert logged == pytest.approx((clamped[mask].sum() / mask.sum()).item(), rel=1e-5)
