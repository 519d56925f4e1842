"""Held-out evaluation: metric keys and ranges, pass@k and distinct correct answers from the samples, per-prompt
values, NLL against the model's own loss (and of the whole answer set for a many-answer task), the KL to a reference,
determinism, entropy bounds."""

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
                "completion_length", "nll", "seq_nll", "ref_entropy", "num_samples", "pass_at_k", "distinct_correct",
                "entropy_by_position", "per_prompt"}
    assert set(m) == expected
    assert m["num_prompts"] == 40 and m["num_samples"] == 16 and set(m["pass_at_k"]) == {"1", "4", "16"}
    assert {k: len(v) for k, v in m["per_prompt"].items()} == {"reward": 40, "correct": 40, "nll": 40}
    assert m["pass_at_k"]["1"] == pytest.approx(m["sampled_accuracy"])  # pass@1 is the sampled accuracy
    assert m["pass_at_k"]["1"] <= m["pass_at_k"]["4"] <= m["pass_at_k"]["16"]
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


def test_pass_at_k_and_distinct_from_a_scripted_policy(tokenizer, monkeypatch):
    """A stand-in generator returns fixed samples: 2 of 4 correct (two distinct) on the first prompt, none on the
    second. pass@1 = 0.5 / 0 and pass@4 = 1 / 0 (pass@16 is not reported: k <= n only)."""
    from llm_entreg.tasks import evaluation as ev
    from llm_entreg.tasks.data import Problem

    problems = [Problem("between", "3<?<9=", "6"), Problem("add", "2+2=", "4")]
    scripted = {"3<?<9=": ["4", "5", "9", "x"], "2+2=": ["5", "3", "22", "44"]}

    def fake_generate(model, tokenizer, prompts, do_sample=False, *args, **kwargs):
        seen = {}
        texts = []
        for p in prompts:
            texts.append(scripted[p][seen.get(p, 0)] if do_sample else scripted[p][0])
            seen[p] = seen.get(p, 0) + 1
        return ev.Generations(texts=texts, token_ids=[[1, 2]] * len(texts), entropies=[[0.5, 0.1]] * len(texts))

    monkeypatch.setattr(ev, "generate_completions", fake_generate)
    monkeypatch.setattr(ev, "reference_stats", lambda *a, **k: {"nll": 0.0, "seq_nll": 0.0, "ref_entropy": 0.0,
                                                               "per_prompt_nll": [0.0, 0.0]})
    m = ev.evaluate(None, tokenizer, problems, num_samples=4)
    assert m["per_prompt"]["correct"] == [2, 0]
    assert m["pass_at_k"] == pytest.approx({"1": 0.25, "4": 0.5})
    assert m["distinct_correct"] == 1.0  # (2 + 0) / 2 prompts
    assert m["entropy_by_position"] == pytest.approx([0.5, 0.1])
    m2 = ev.evaluate(None, tokenizer, problems, num_samples=2, greedy=False)
    assert m2["pass_at_k"] == pytest.approx({"1": 0.5})  # the first 2 samples: 2/2 and 0/2 correct; only k = 1 <= n


def test_answer_set_nll_and_kl_to_reference(tokenizer):
    """On a many-answer task the NLL is -log of the probability of the whole correct set (from every answer's
    teacher-forced probability); the KL of a model to itself is 0 and to another model positive."""
    from llm_entreg.tasks.data import Problem, correct_answers

    model = build_tiny_model(tokenizer, hidden_size=32, layers=1, heads=2, seed=1)
    problems = [Problem("between", "10<?<14=", "12"), Problem("between", "3<?<9=", "6")]
    stats = reference_stats(model, tokenizer, problems, per_prompt=True)
    for problem, nll in zip(problems, stats["per_prompt_nll"]):
        answers = [Problem("between", problem.prompt, a) for a in correct_answers(problem.prompt)]
        input_ids, labels = encode_supervised(tokenizer, answers)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].double(), -1)
        targets = labels[:, 1:]
        token_lp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
        set_prob = token_lp.sum(-1).exp().sum().item()  # p(answer <eos>) summed over the correct answers
        assert nll == pytest.approx(-math.log(set_prob), rel=1e-4)
    assert stats["nll"] == pytest.approx(sum(stats["per_prompt_nll"]) / 2)
    same = evaluate(model, tokenizer, problems, num_samples=4, greedy=False, reference=model, max_new_tokens=3)
    assert abs(same["kl_to_reference"]) < 1e-5
    other = build_tiny_model(tokenizer, hidden_size=32, layers=1, heads=2, seed=2)
    assert evaluate(model, tokenizer, problems, num_samples=4, greedy=False, reference=other,
                    max_new_tokens=3)["kl_to_reference"] > 1e-3
