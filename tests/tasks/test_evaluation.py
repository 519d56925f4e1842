"""Held-out evaluation: metric keys and ranges, NLL against the model's own loss, determinism, entropy bounds."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.tasks import (
    build_tiny_model,
    encode_supervised,
    evaluate,
    format_reward,
    generate_completions,
    make_splits,
    reference_stats,
)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=32, layers=1, heads=2, seed=0)


@pytest.fixture(scope="module")
def problems():
    return make_splits()["validation"][:40]


def test_metrics_keys_and_ranges(model, tokenizer, problems):
    m = evaluate(model, tokenizer, problems, batch_size=16)
    expected = {"num_prompts", "accuracy", "reward", "greedy_entropy", "sampled_accuracy", "sampled_reward", "entropy",
                "completion_length", "nll", "seq_nll", "ref_entropy"}
    assert set(m) == expected
    assert m["num_prompts"] == 40
    for key in ("accuracy", "reward", "sampled_accuracy", "sampled_reward"):
        assert 0.0 <= m[key] <= 1.0
    log_v = math.log(len(tokenizer))
    for key in ("entropy", "greedy_entropy", "ref_entropy"):
        assert 0.0 < m[key] <= log_v + 1e-4
    # A random init is close to uniform over the vocabulary.
    assert m["ref_entropy"] > 0.9 * log_v and m["nll"] > 0.9 * log_v
    assert 1 <= m["completion_length"] <= 8
    assert model.training  # restored (build_tiny_model returns a model in training mode)


def test_nll_matches_model_loss(model, tokenizer, problems):
    input_ids, labels = encode_supervised(tokenizer, problems)
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels).loss
    stats = reference_stats(model, tokenizer, problems, batch_size=7)  # batching must not change the token mean
    assert stats["nll"] == pytest.approx(loss.item(), rel=1e-5)
    n_tokens = int((labels != -100).sum())
    assert stats["seq_nll"] == pytest.approx(loss.item() * n_tokens / len(problems), rel=1e-5)


def test_encode_supervised_masks(tokenizer, problems):
    input_ids, labels = encode_supervised(tokenizer, problems[:3])
    for i, p in enumerate(problems[:3]):
        scored = labels[i][labels[i] != -100].tolist()
        assert scored == tokenizer(p.answer)["input_ids"][1:] + [tokenizer.eos_token_id]
        assert input_ids[i, 0] == tokenizer.bos_token_id


def test_generation_deterministic_and_rng_neutral(model, tokenizer, problems):
    prompts = [p.prompt for p in problems]
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = generate_completions(model, tokenizer, prompts, do_sample=True, seed=3, batch_size=16)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_completions(model, tokenizer, prompts, do_sample=True, seed=3, batch_size=16)
    assert a.texts == b.texts and a.token_ids == b.token_ids
    for ids, ents in zip(a.token_ids, a.entropies):
        assert len(ids) == len(ents) and 1 <= len(ids) <= 8
        assert tokenizer.eos_token_id not in ids[:-1]  # cut right after the first <eos>
    g1 = generate_completions(model, tokenizer, prompts, batch_size=16)
    g2 = generate_completions(model, tokenizer, prompts, batch_size=40)
    assert g1.texts == g2.texts  # left padding does not change greedy completions


def test_reward_weights_and_partial_passes(model, tokenizer, problems):
    m = evaluate(model, tokenizer, problems, reward_funcs=[format_reward], reward_weights=[0.5], sampled=False)
    assert "entropy" not in m and 0.0 <= m["reward"] <= 0.5
    with pytest.raises(ValueError, match="reward_weights"):
        evaluate(model, tokenizer, problems, reward_weights=[1.0, 2.0])


def test_accepts_datasets(model, tokenizer):
    from llm_entreg.tasks import build_datasets

    data = build_datasets(n_prompts=8)
    m = evaluate(model, tokenizer, data.prompts["validation"].select(range(8)), sampled=False)
    assert m["num_prompts"] == 8
