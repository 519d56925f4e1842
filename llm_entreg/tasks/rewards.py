"""Verifiable reward functions in TRL's GRPO reward-function convention (``correctness``, ``format``,
``partial_credit``); each also works called by hand with prompts and completions. The calling convention:
docs/embedded_default.md ("Reward functions").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .data import is_correct, solve, task_of

_FORMAT = {"add": re.compile(r"^\d{1,6}$"), "reverse": re.compile(r"^[a-z]+$"), "between": re.compile(r"^\d{1,6}$")}


def completion_text(completion) -> str:
    """The text of one completion: a string as is; for a conversational completion (list of message dicts, or one
    dict), the content of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


def prompt_text(prompt) -> str:
    """The text of one prompt: a string as is; for a conversational prompt, the content of the last user turn."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        for message in reversed(list(prompt)):
            if isinstance(message, dict) and message.get("role", "user") == "user":
                return str(message.get("content", ""))
    return ""


def _answers(prompts, answer) -> list[str | None]:
    if answer is not None:
        if len(answer) != len(prompts):
            raise ValueError(f"answer: expected {len(prompts)} answers (one per prompt), got {len(answer)}")
        return [None if a is None else str(a) for a in answer]
    return [solve(prompt_text(p)) for p in prompts]


def correctness_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 for a correct completion, else 0.0: an exact match with ``answer``, or, for a many-answer task
    (``between``), any of its correct answers.

    ``answer`` is the dataset column GRPO passes through; without it the answer is recomputed from the prompt.
    A prompt whose answer is unknown gives None (NaN in TRL: ignored by its reward aggregation).
    """
    out = []
    for prompt, completion, ans in zip(prompts, completions, _answers(prompts, answer), strict=True):
        ok = is_correct(prompt_text(prompt), completion_text(completion), ans)
        out.append(None if ok is None else float(ok))
    return out


def format_reward(prompts, completions, task=None, **kwargs) -> list[float]:
    """1.0 if the stripped completion has the answer format of its task (right or wrong), else 0.0."""
    tasks = list(task) if task is not None else [task_of(prompt_text(p)) for p in prompts]
    if len(tasks) != len(completions):
        raise ValueError(f"task: expected {len(completions)} entries, got {len(tasks)}")
    out = []
    for completion, t in zip(completions, tasks, strict=True):
        pattern = _FORMAT.get(t)
        out.append(None if pattern is None else float(bool(pattern.match(completion_text(completion).strip()))))
    return out


def partial_credit_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """Characters right in position divided by ``max(len(answer), len(completion))`` (1.0 only when exact); for a
    many-answer task, the correctness reward."""
    out = []
    for prompt, completion, ans in zip(prompts, completions, _answers(prompts, answer), strict=True):
        if ans is None:
            out.append(None)
            continue
        text = completion_text(completion).strip()
        if task_of(prompt_text(prompt)) == "between":
            out.append(float(is_correct(prompt_text(prompt), text)))
            continue
        hits = sum(a == b for a, b in zip(text, ans))
        out.append(hits / max(len(ans), len(text), 1))
    return out


#: The reward functions by name (for recipes / the CLI).
REWARD_FUNCS = {
    "correctness": correctness_reward,
    "format": format_reward,
    "partial_credit": partial_credit_reward,
}


def get_reward_funcs(names: Sequence[str] | str) -> list:
    """Reward functions by name, e.g. ``get_reward_funcs(["correctness", "format"])``."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"reward_funcs: unknown {unknown}; expected names from {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[n] for n in names]
