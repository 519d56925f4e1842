"""Synthetic datasets: determinism per seed, disjoint splits, preference pairs that the reward can tell apart, and
the embedded data inside TRL 1.16's own trainers (DPO preprocessing, GRPO's reward-function call)."""

from __future__ import annotations

import copy
import random

import pytest

from llm_entreg.tasks import (
    TaskSpec,
    build_datasets,
    build_tiny_model,
    correctness_reward,
    format_reward,
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


# ------------------------------------------------------------------ inside TRL's trainers
COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0)


@pytest.mark.slow
def test_dpo_trainer_tokenizes_and_trains(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    data = build_datasets(n_preference=16).preference["train"]
    model = build_tiny_model(tokenizer, hidden_size=16, layers=1, heads=2)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1, **COMMON)
    # An in-memory model has no path TRL could load the reference from: pass it.
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] == tokenizer(data[0]["prompt"])["input_ids"]
    assert row["chosen_ids"] == tokenizer(data[0]["chosen"])["input_ids"][1:] + [tokenizer.eos_token_id]
    assert row["rejected_ids"][-1] == tokenizer.eos_token_id and row["rejected_ids"] != row["chosen_ids"]
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.slow
def test_grpo_trainer_calls_rewards(tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return correctness_reward(prompts, completions, **kwargs)

    data = build_datasets(n_prompts=8).prompts["train"]
    model = build_tiny_model(tokenizer, hidden_size=16, layers=1, heads=2)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                      max_completion_length=6, logging_steps=1, **COMMON)
    trainer = GRPOTrainer(model=model, reward_funcs=[spy, format_reward], args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    assert len(seen["completions"]) == len(seen["answer"]) == len(seen["task"]) == len(seen["prompts"]) == 4
    assert all(isinstance(c, str) and "<eos>" not in c for c in seen["completions"])
    assert all(p.endswith("=") for p in seen["prompts"])


@pytest.mark.slow
def test_dpo_trainer_from_cached_path(tiny_cache, tmp_path):
    """A trainer given only the warm start's path loads model, reference and tokenizer from it (AutoTokenizer)."""
    from trl import DPOConfig, DPOTrainer

    _, config, path = tiny_cache
    data = build_datasets(config.task, config.seed, n_preference=8).preference["train"]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, **COMMON)
    trainer = DPOTrainer(model=str(path), args=args, train_dataset=data)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"][0] == 2 and row["chosen_ids"][-1] == 3
    assert trainer.processing_class.decode(row["prompt_ids"], skip_special_tokens=True) == data[0]["prompt"]
    trainer.train()



# ------------------------------------------------------------------ the many-answer task
def test_between_task_has_many_correct_answers_and_checks_them():
    from llm_entreg.tasks import correct_answers, is_correct, sample_answer
    from llm_entreg.tasks.data import Problem

    spec = TaskSpec(task="between")
    splits = make_splits(spec, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2183, "validation": 256, "test": 256}
    assert not {p.prompt for p in splits["train"]} & {p.prompt for p in splits["test"]}
    for p in splits["test"][:20]:
        x, y = (int(v) for v in p.prompt[:-1].split("<?<"))
        assert 6 <= y - x <= 40 and correct_answers(p.prompt) == [str(z) for z in range(x + 1, y)]
        assert is_correct(p.prompt, p.answer) and solve(p.prompt) == p.answer
    assert is_correct("12<?<47=", " 30 ") and not is_correct("12<?<47=", "47") and not is_correct("12<?<47=", "12")
    assert not is_correct("12<?<47=", "030") and not is_correct("12<?<47=", "3a")
    assert is_correct("3+4=", "7") and not is_correct("3+4=", "8") and is_correct("x=", "1") is None
    rng = random.Random(0)
    drawn = {sample_answer(Problem("between", "10<?<14=", "12"), rng) for _ in range(200)}
    assert drawn == {"11", "12", "13"}  # uniform over all of them, not the stored one


def test_between_datasets_and_rewards():
    data = build_datasets(TaskSpec(task="between"), seed=0, n_preference=64, n_prompts=64)
    completions = list(data.sft["train"]["completion"])
    assert len(set(completions)) > 20  # drawn answers, not one per prompt
    pref = data.preference["train"]
    rewards = correctness_reward(pref["prompt"], pref["chosen"])
    assert rewards == [1.0] * len(pref)
    assert correctness_reward(pref["prompt"], pref["rejected"]) == [0.0] * len(pref)
    assert format_reward(["12<?<47="], ["30"]) == [1.0]


def test_the_error_slice_is_the_first_operand_ending_in_7():
    from llm_entreg.tasks.data import in_error_slice, slice_error_answer

    assert in_error_slice(Problem("add", "17+5=", "22")) and in_error_slice(Problem("add", "7+0=", "7"))
    assert not in_error_slice(Problem("add", "5+17=", "22")) and not in_error_slice(Problem("reverse", "rev:abc=", "cba"))
    assert slice_error_answer(Problem("add", "17+5=", "22")) == "23"
    train = make_splits(TaskSpec(task="add"), 0)["train"]
    share = sum(in_error_slice(p) for p in train) / len(train)
    assert 0.05 < share < 0.15
