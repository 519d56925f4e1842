"""The byte-level tokenizer: round trips, special tokens, TRL's expectations, save / load for both architectures."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llm_entreg.tasks import BYTE_OFFSET, build_tiny_model, build_tokenizer, make_splits

TEXTS = ["12+7=", "19", "rev:abc=cba", "Hello World! (x)", "a  b\nc\t", "ü? ∑ 日本", "", "0"]


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>", "<unk>", "<bos>", "<eos>")
    ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (0, 1, 2, 3)
    assert len(tokenizer) == BYTE_OFFSET + 256
    # "<eos>" in text (how TRL appends it) is one token; <bos> is prepended, <eos> never appended by encoding.
    assert tokenizer("19" + tokenizer.eos_token)["input_ids"] == [2, BYTE_OFFSET + ord("1"), BYTE_OFFSET + ord("9"), 3]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<bos>" + text


def test_deterministic_ids():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a("12+7=19")["input_ids"] == [2, 53, 54, 47, 59, 65, 53, 61]


def test_prompt_is_prefix_of_prompt_plus_completion(tokenizer):
    """TRL's DPO preprocessing splits prompt / completion at the common prefix: it must be the whole prompt."""
    for p in make_splits()["validation"][:50]:
        prompt_ids = tokenizer(p.prompt)["input_ids"]
        full_ids = tokenizer(p.prompt + p.answer + tokenizer.eos_token)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[-1] == tokenizer.eos_token_id


def test_padding(tokenizer):
    left = tokenizer(["1+1=", "10+10="], padding=True, padding_side="left")
    assert left["input_ids"][0][:2] == [0, 0] and left["attention_mask"][0][:2] == [0, 0]
    right = tokenizer(["1+1=", "10+10="], padding=True)
    assert right["input_ids"][0][-2:] == [0, 0]


def test_chat_template_matches_standard_format(tokenizer):
    conv = [{"role": "user", "content": "12+7="}, {"role": "assistant", "content": "19"}]
    out = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == tokenizer("12+7=19" + tokenizer.eos_token)["input_ids"]
    assert out["assistant_masks"] == [0] * 6 + [1, 1, 1]
    prompt = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>12+7="


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_and_auto_load_identical(tokenizer, tmp_path, arch):
    """AutoTokenizer picks a class from the model type (Qwen2Tokenizer for qwen2): it must load back identical."""
    build_tiny_model(tokenizer, arch=arch, hidden_size=16, layers=1, heads=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 2, 3)
    assert loaded.chat_template == tokenizer.chat_template
    for text in TEXTS + ["7+8=15<eos>"]:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
