"""Synthetic datasets: determinism per seed, disjoint splits, preference pairs that the reward can tell apart."""

from __future__ import annotations

import random

import pytest

from llm_entreg.tasks import (
    TaskSpec,
    build_datasets,
    correctness_reward,
    make_splits,
    problems_from_dataset,
    solve,
    tokenize_prompts,
    wrong_answer,
)
from llm_entreg.tasks.data import Problem

SMALL = {
    "add": TaskSpec(task="add", max_operand=40, n_validation=50, n_test=50),
    "reverse": TaskSpec(task="reverse", rev_pool_size=600, n_validation=50, n_test=50),
    "mix": TaskSpec(task="mix", max_operand=40, rev_pool_size=600, n_validation=50, n_test=50),
}


@pytest.mark.parametrize("task", list(SMALL))
def test_deterministic_per_seed(task):
    spec = SMALL[task]
    a, b, c = build_datasets(spec, seed=3), build_datasets(spec, seed=3), build_datasets(spec, seed=4)
    for kind in ("sft", "preference", "prompts"):
        for split in ("train", "validation", "test"):
            assert getattr(a, kind)[split].to_dict() == getattr(b, kind)[split].to_dict()
    assert a.preference["train"].to_dict() != c.preference["train"].to_dict()
    assert a.problems["validation"] != c.problems["validation"]


@pytest.mark.parametrize("task", list(SMALL))
def test_splits_disjoint_and_sized(task):
    spec = SMALL[task]
    splits = make_splits(spec, seed=0)
    prompts = {name: {p.prompt for p in probs} for name, probs in splits.items()}
    for name, probs in splits.items():
        assert len(prompts[name]) == len(probs), f"duplicate prompts in {name}"
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    n_tasks = 2 if task == "mix" else 1
    assert len(splits["validation"]) == len(splits["test"]) == 50 * n_tasks
    if task == "mix":
        assert {p.task for p in splits["validation"]} == {"add", "reverse"}


def test_default_add_split_sizes():
    splits = make_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 10_000 - 512, "validation": 256, "test": 256}


@pytest.mark.parametrize("task", list(SMALL))
def test_answers_verifiable(task):
    for p in make_splits(SMALL[task], seed=1)["train"][:200]:
        assert solve(p.prompt) == p.answer
        assert p.prompt.endswith("=")


@pytest.mark.parametrize("task", list(SMALL))
def test_preference_pairs(task):
    data = build_datasets(SMALL[task], seed=0, n_preference=300)
    pref = data.preference["train"]
    assert pref.column_names == ["prompt", "chosen", "rejected"]
    assert len(pref) == 300
    assert all(c != r for c, r in zip(pref["chosen"], pref["rejected"]))
    assert correctness_reward(pref["prompt"], pref["chosen"]) == [1.0] * len(pref)
    assert correctness_reward(pref["prompt"], pref["rejected"]) == [0.0] * len(pref)
    # No <eos> in the data: TRL appends it.
    assert not any("<eos>" in x for x in list(pref["chosen"]) + list(pref["rejected"]))


def test_wrong_answers_plausible():
    rng = random.Random(0)
    for c in [0, 1, 9, 10, 19, 55, 100, 198]:
        for _ in range(20):
            w = wrong_answer(Problem("add", "?", str(c)), rng)
            assert w != str(c) and w.isdigit() and not (len(w) > 1 and w.startswith("0"))
            assert abs(int(w) - c) <= 90
    for s in ["aab", "abc", "aaaa", "ab"]:
        for _ in range(20):
            w = wrong_answer(Problem("reverse", "?", s), rng)
            assert w != s and w.isalpha()


def test_sft_and_prompt_datasets(tokenizer):
    data = build_datasets(SMALL["add"], seed=0, n_prompts=64)
    sft = data.sft["validation"]
    assert sft.column_names == ["prompt", "completion"]
    assert correctness_reward(sft["prompt"], sft["completion"]) == [1.0] * len(sft)
    prompts = data.prompts["train"]
    assert prompts.column_names == ["prompt", "answer", "task"] and len(prompts) == 64
    tokenized = tokenize_prompts(prompts, tokenizer)
    assert tokenized[0]["input_ids"] == tokenizer(prompts[0]["prompt"])["input_ids"]
    back = problems_from_dataset(prompts)
    assert [p.answer for p in back] == list(prompts["answer"])
    assert [p.answer for p in problems_from_dataset(sft)] == list(sft["completion"])  # recomputed from prompts


@pytest.mark.parametrize(
    "kwargs, field",
    [({"task": "mul"}, "task"), ({"max_operand": 2}, "max_operand"),
     ({"rev_min_len": 5, "rev_max_len": 3}, "rev_min_len"),
     ({"task": "reverse", "rev_pool_size": 10**9}, "rev_pool_size"), ({"n_validation": 0}, "n_validation")],
)
def test_invalid_spec(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TaskSpec(**kwargs)
