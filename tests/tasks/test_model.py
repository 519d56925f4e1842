"""Tiny model builder: shapes, vocabulary, untied head, seeding, architectures, config validation."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.tasks import build_tiny_model, count_parameters, tiny_model_config


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_forward_shape_and_vocab(tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.shape == (len(tokenizer), 64)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.config.tie_word_embeddings
    batch = tokenizer(["12+7=19", "3+4="], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert 50_000 < count_parameters(model) < 500_000


def test_seeded_and_rng_neutral(tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_tiny_model(tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = build_tiny_model(tokenizer, seed=0)
    c = build_tiny_model(tokenizer, seed=1)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_sizes_and_generation_config(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, layers=3, heads=4, kv_heads=2, intermediate_size=48)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 3, 4, 2)
    assert cfg.intermediate_size == 48
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (0, 2, 3)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"arch": "gpt2"}, "arch"), ({"hidden_size": 30, "heads": 4}, "hidden_size"), ({"kv_heads": 3}, "kv_heads"),
     ({"layers": 0}, "layers")],
)
def test_invalid_config(tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_model_config(tokenizer, **kwargs)
