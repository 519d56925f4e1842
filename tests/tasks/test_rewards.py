"""Reward functions on hand-written completions, in TRL's GRPO calling convention."""

from __future__ import annotations

import pytest

from llm_entreg.tasks import correctness_reward, format_reward, get_reward_funcs, partial_credit_reward

PROMPTS = ["12+7=", "12+7=", "12+7=", "12+7=", "12+7=", "rev:abc=", "rev:abc=", "rev:abc="]
COMPLETIONS = ["19", " 19\n", "18", "19 19", "", "cba", "abc", "CBA"]


def test_correctness_recomputes_answer_from_prompt():
    assert correctness_reward(PROMPTS, COMPLETIONS) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_correctness_uses_answer_column_and_trl_kwargs():
    # GRPOTrainer passes completion_ids, every extra column, trainer_state, log_extra and log_metric.
    out = correctness_reward(
        prompts=["a", "b"], completions=["7", "8"], completion_ids=[[1], [2]], answer=["7", "9"], task=["x", "y"],
        trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None,
    )
    assert out == [1.0, 0.0]


def test_conversational_completions():
    prompts = [[{"role": "user", "content": "2+2="}]] * 2
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]]
    assert correctness_reward(prompts, completions) == [1.0, 0.0]


def test_unknown_prompt_gives_none():
    assert correctness_reward(["what?"], ["4"]) == [None]


def test_format_reward():
    assert format_reward(PROMPTS, COMPLETIONS) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert format_reward(["x"], ["4"], task=["add"]) == [1.0]


def test_partial_credit():
    out = partial_credit_reward(["12+7=", "12+7=", "12+7=", "rev:abc=", "rev:abc="], ["19", "18", "190", "cbx", ""])
    assert out == pytest.approx([1.0, 0.5, 2 / 3, 2 / 3, 0.0])


def test_answer_length_mismatch_raises():
    with pytest.raises(ValueError, match="answer"):
        correctness_reward(["1+1="], ["2"], answer=["2", "3"])


def test_get_reward_funcs():
    assert get_reward_funcs(["correctness", "format"]) == [correctness_reward, format_reward]
    assert get_reward_funcs("partial_credit") == [partial_credit_reward]
    with pytest.raises(ValueError, match="reward_funcs"):
        get_reward_funcs(["nope"])
