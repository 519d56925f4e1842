"""install_fused_head is a drop-in for TRL's add_fused_lm_head: same outputs and gradients on the same model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

from llm_entreg.integrations import install_fused_head

ALL = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _tiny_model(seed: int, vocab: int = 211):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).float()


def _batch(seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 13), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=gen) < 0.3, -100)
    labels[1, :4] = -100
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_outputs_and_gradients_match_trl(backend, temperature):
    ours = _tiny_model(0)
    theirs = copy.deepcopy(ours)
    captured = []
    install_fused_head(ours, temperature=temperature, outputs=ALL, backend=backend, on_output=captured.append)
    add_fused_lm_head(theirs, temperature=temperature, outputs=ALL)
    input_ids, attention_mask, labels = _batch(1, 211)
    out = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    ref = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    assert captured and captured[-1] is out
    for field in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "loss"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), atol=2e-5, rtol=2e-5, msg=field)
    assert torch.equal(out.is_top1, ref.is_top1)
    assert torch.equal(out.label_mask, ref.label_mask)

    gen = torch.Generator().manual_seed(2)
    g_lp, g_h = torch.randn(out.log_probs.shape, generator=gen), torch.randn(out.log_probs.shape, generator=gen)
    ((out.log_probs * g_lp).sum() + (out.entropy * g_h).sum()).backward()
    ((ref.log_probs * g_lp).sum() + (ref.entropy * g_h).sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=5e-5, rtol=5e-4, msg=name)


def test_shift_labels_num_items_and_unfused_path():
    ours = _tiny_model(3)
    theirs = copy.deepcopy(ours)
    install_fused_head(ours, outputs=("log_probs", "entropy"))
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy"))
    input_ids, attention_mask, labels = _batch(4, 211)
    shift = labels[:, 1:]
    kwargs = dict(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], shift_labels=shift)
    out = ours(**kwargs, num_items_in_batch=7, fused_lm_head=True)
    ref = theirs(**kwargs, num_items_in_batch=7, fused_lm_head=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    assert out.mean_logits is None and out.is_top1 is None
    # Without fused_lm_head the model's own forward runs: logits and its own loss
    plain = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    plain_ref = theirs(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(plain.logits, plain_ref.logits)
    torch.testing.assert_close(plain.loss, plain_ref.loss)


def test_bad_outputs_and_missing_labels_are_refused():
    model = _tiny_model(5)
    with pytest.raises(ValueError, match="^outputs"):
        install_fused_head(model, outputs=("log_probs", "entropies"))
    install_fused_head(model)
    with pytest.raises(ValueError, match="^labels"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), fused_lm_head=True)
