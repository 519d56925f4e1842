"""Tiny randomly initialised causal LMs (Qwen2 or Llama architecture) for the embedded default task.

The model is a real ``transformers`` model (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``), so every TRL trainer,
``save_pretrained`` / ``from_pretrained``, ``generate`` and the fused LM-head hooks see exactly what they would see
with a real checkpoint, only much smaller. ``tie_word_embeddings=False``: the LM head has its own weight.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers import Qwen2Config, Qwen2ForCausalLM

ARCHS = ("qwen2", "llama")


def tiny_model_config(
    tokenizer: PreTrainedTokenizerBase,
    arch: str = "qwen2",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
):
    """The ``transformers`` config of a tiny model whose vocabulary is ``len(tokenizer)``.

    ``kv_heads`` defaults to ``heads`` (plain multi-head attention); ``intermediate_size`` to ``4 * hidden_size``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    for name, value in (("hidden_size", hidden_size), ("layers", layers), ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size: {hidden_size} is not divisible by heads={heads}")
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads: must divide heads={heads}, got {kv_heads}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    arch: str = "qwen2",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A tiny randomly initialised causal LM (float32, eval mode off: ``model.training`` is True).

    The initialisation is deterministic in ``seed`` and does not disturb the caller's global RNG state.
    The generation config carries the tokenizer's pad / bos / eos ids so ``generate`` stops on ``<eos>``.
    """
    config = tiny_model_config(
        tokenizer,
        arch=arch,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.to(dtype)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (each tensor counted once)."""
    return sum(p.numel() for p in model.parameters())
