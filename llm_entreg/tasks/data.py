"""Synthetic tasks with a verifiable answer (``add``, ``reverse``, ``mix``; ``between``, with many correct answers per
prompt) and the SFT, preference and prompt datasets built from them in TRL's standard text format; disjoint splits,
a pure function of ``(spec, seed)``. Details: docs/embedded_default.md ("Tasks and datasets").
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from datasets import Dataset

TASKS = ("add", "reverse", "mix", "between")
#: Tasks whose prompts have many correct answers (any of them earns the reward).
MANY_ANSWER_TASKS = ("between",)
SPLITS = ("train", "validation", "test")

_ADD_RE = re.compile(r"^(\d+)\+(\d+)=$")
_REV_RE = re.compile(r"^rev:([a-z]+)=$")
_BETWEEN_RE = re.compile(r"^(\d+)<\?<(\d+)=$")
_INTEGER_RE = re.compile(r"^(0|[1-9]\d*)$")


@dataclass(frozen=True)
class TaskSpec:
    """Which synthetic task, and its sizes.

    Args:
        task: ``"add"`` (default), ``"reverse"``, ``"mix"`` (add and reverse), or ``"between"``: ``"12<?<47="``, any
            integer strictly between the two is correct (the exploration task: many correct answers per prompt).
        max_operand: ``add`` operands are drawn from ``[0, max_operand]``; default 99 (10,000 distinct problems).
            ``between`` bounds too lie in ``[0, max_operand]``.
        between_min_gap, between_max_gap: ``between`` prompts have ``min_gap <= y - x <= max_gap``, i.e. from
            ``min_gap - 1`` to ``max_gap - 1`` correct answers; default 6 and 40 (about 2,900 distinct prompts).
        rev_min_len, rev_max_len: ``reverse`` string lengths (inclusive); default 3..6.
        rev_alphabet: letters of the ``reverse`` strings; default ``"abcdefghij"``.
        rev_pool_size: number of distinct ``reverse`` problems; default 6000.
        n_validation, n_test: held-out problems per task; default 256 each.
    """

    task: str = "add"
    max_operand: int = 99
    rev_min_len: int = 3
    rev_max_len: int = 6
    rev_alphabet: str = "abcdefghij"
    rev_pool_size: int = 6000
    n_validation: int = 256
    n_test: int = 256
    between_min_gap: int = 6
    between_max_gap: int = 40

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        if not isinstance(self.max_operand, int) or self.max_operand < 3:
            raise ValueError(f"max_operand: expected an int >= 3, got {self.max_operand!r}")
        if not 1 <= self.rev_min_len <= self.rev_max_len:
            raise ValueError(
                f"rev_min_len/rev_max_len: need 1 <= min <= max, got {self.rev_min_len}..{self.rev_max_len}"
            )
        if len(set(self.rev_alphabet)) < 2 or not re.fullmatch(r"[a-z]+", self.rev_alphabet):
            raise ValueError(f"rev_alphabet: need >= 2 distinct lower-case letters, got {self.rev_alphabet!r}")
        for name in ("n_validation", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        need = self.n_validation + self.n_test + 1
        if not 2 <= self.between_min_gap <= self.between_max_gap:
            raise ValueError(f"between_min_gap/between_max_gap: need 2 <= min <= max, got "
                             f"{self.between_min_gap}..{self.between_max_gap}")
        if self.task == "between" and len(_between_bounds(self)) < need:
            raise ValueError(f"between_max_gap: {self.between_min_gap}..{self.between_max_gap} with max_operand "
                             f"{self.max_operand} gives too few problems for the held-out splits")
        if self.task in ("add", "mix") and (self.max_operand + 1) ** 2 < need:
            raise ValueError(f"max_operand: {self.max_operand} gives too few problems for the held-out splits")
        if self.task in ("reverse", "mix"):
            space = sum(len(set(self.rev_alphabet)) ** n for n in range(self.rev_min_len, self.rev_max_len + 1))
            if self.rev_pool_size < need or self.rev_pool_size > space // 2:
                raise ValueError(
                    f"rev_pool_size: need {need} <= rev_pool_size <= {space // 2} (half the string space), "
                    f"got {self.rev_pool_size}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` (ends with ``=``), its correct ``answer``, and the ``task`` it belongs to."""

    task: str
    prompt: str
    answer: str


# ---------------------------------------------------------------------------------------------------------------
# Problems and answers


def add_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def reverse_prompt(s: str) -> str:
    return f"rev:{s}="


def between_prompt(x: int, y: int) -> str:
    return f"{x}<?<{y}="


def task_of(prompt: str) -> str | None:
    """``"add"``, ``"reverse"``, ``"between"`` or None (not a prompt of a built-in task)."""
    if _ADD_RE.match(prompt):
        return "add"
    if _REV_RE.match(prompt):
        return "reverse"
    if _BETWEEN_RE.match(prompt):
        return "between"
    return None


def solve(prompt: str) -> str | None:
    """A correct answer of a built-in task's prompt, recomputed from the prompt itself (None if unknown); for
    ``between``, whose every integer in the interval is correct, the midpoint."""
    m = _ADD_RE.match(prompt)
    if m:
        return str(int(m.group(1)) + int(m.group(2)))
    m = _REV_RE.match(prompt)
    if m:
        return m.group(1)[::-1]
    m = _BETWEEN_RE.match(prompt)
    if m:
        return str((int(m.group(1)) + int(m.group(2))) // 2)
    return None


def correct_answers(prompt: str) -> list[str] | None:
    """Every correct answer of a many-answer prompt (None for the other tasks, whose answer is unique)."""
    m = _BETWEEN_RE.match(prompt)
    if m:
        return [str(z) for z in range(int(m.group(1)) + 1, int(m.group(2)))]
    return None


def is_correct(prompt: str, completion: str, answer: str | None = None) -> bool | None:
    """Whether ``completion`` (stripped) answers ``prompt``: any integer strictly inside a ``between`` interval, written
    without leading zeros; else an exact match with ``answer`` (recomputed from the prompt when not given). None when
    the answer is unknown."""
    text = completion.strip()
    m = _BETWEEN_RE.match(prompt)
    if m:
        return bool(_INTEGER_RE.match(text)) and int(m.group(1)) < int(text) < int(m.group(2))
    answer = solve(prompt) if answer is None else answer
    return None if answer is None else text == answer


def _rng(seed: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across processes and machines.
    return random.Random(f"llm_entreg.tasks:{seed}:{purpose}")


def _add_pool(spec: TaskSpec, seed: int) -> list[Problem]:
    n = spec.max_operand + 1
    pool = [Problem("add", add_prompt(a, b), str(a + b)) for a in range(n) for b in range(n)]
    _rng(seed, "pool:add").shuffle(pool)
    return pool


def _reverse_pool(spec: TaskSpec, seed: int) -> list[Problem]:
    rng = _rng(seed, "pool:reverse")
    alphabet = sorted(set(spec.rev_alphabet))
    seen: set[str] = set()
    pool: list[Problem] = []
    while len(pool) < spec.rev_pool_size:
        length = rng.randint(spec.rev_min_len, spec.rev_max_len)
        s = "".join(rng.choice(alphabet) for _ in range(length))
        if s in seen:
            continue
        seen.add(s)
        pool.append(Problem("reverse", reverse_prompt(s), s[::-1]))
    return pool


def _between_bounds(spec: TaskSpec) -> list[tuple[int, int]]:
    top = spec.max_operand
    return [(x, y) for x in range(top + 1)
            for y in range(x + spec.between_min_gap, min(top, x + spec.between_max_gap) + 1)]


def _between_pool(spec: TaskSpec, seed: int) -> list[Problem]:
    pool = [Problem("between", between_prompt(x, y), str((x + y) // 2)) for x, y in _between_bounds(spec)]
    _rng(seed, "pool:between").shuffle(pool)
    return pool


def make_splits(spec: TaskSpec | None = None, seed: int = 0) -> dict[str, list[Problem]]:
    """Disjoint ``train`` / ``validation`` / ``test`` problem lists (deterministic in ``spec`` and ``seed``).

    For ``mix`` each split holds both tasks (``n_validation`` / ``n_test`` of each), interleaved deterministically.
    """
    spec = spec or TaskSpec()
    pools = []
    if spec.task in ("add", "mix"):
        pools.append(_add_pool(spec, seed))
    if spec.task in ("reverse", "mix"):
        pools.append(_reverse_pool(spec, seed))
    if spec.task == "between":
        pools.append(_between_pool(spec, seed))
    splits: dict[str, list[Problem]] = {name: [] for name in SPLITS}
    for pool in pools:
        nv, nt = spec.n_validation, spec.n_test
        splits["validation"] += pool[:nv]
        splits["test"] += pool[nv : nv + nt]
        splits["train"] += pool[nv + nt :]
    if len(pools) > 1:
        for name in SPLITS:
            _rng(seed, f"mix:{name}").shuffle(splits[name])
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Wrong answers for preference pairs


def _wrong_add(answer: str, rng: random.Random) -> str:
    c = int(answer)
    candidates = {c + 1, c - 1, c + 10, c - 10}  # off by one, carry dropped / spurious carry
    if len(answer) > 1:
        swapped = answer[:-2] + answer[-1] + answer[-2]  # last two digits swapped
        if not swapped.startswith("0"):
            candidates.add(int(swapped))
    last = int(answer[-1])
    candidates.add(c - last + rng.choice([d for d in range(10) if d != last]))  # wrong last digit
    options = sorted(x for x in candidates if x >= 0 and x != c)
    return str(rng.choice(options))


def _wrong_reverse(answer: str, rng: random.Random, alphabet: str) -> str:
    original = answer[::-1]
    options = set()
    if original != answer:
        options.add(original)  # forgot to reverse
    for i in range(len(answer) - 1):
        if answer[i] != answer[i + 1]:
            options.add(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])  # two neighbours swapped
    if len(answer) > 1:
        i = rng.randrange(len(answer))
        options.add(answer[:i] + answer[i + 1 :])  # a letter dropped
    i = rng.randrange(len(answer))
    options.add(answer[:i] + rng.choice([ch for ch in alphabet if ch != answer[i]]) + answer[i + 1 :])  # changed
    options.discard(answer)
    return rng.choice(sorted(options))


def _wrong_between(prompt: str, rng: random.Random) -> str:
    x, y = (int(v) for v in _BETWEEN_RE.match(prompt).groups())
    options = {x, y, y + 1, y + rng.randint(2, 9)} | ({x - 1} if x > 0 else set())  # the bounds, just outside
    return str(rng.choice(sorted(options)))


def sample_answer(problem: Problem, rng: random.Random) -> str:
    """A correct answer drawn uniformly from all of the problem's correct answers (its only one for most tasks)."""
    answers = correct_answers(problem.prompt)
    return problem.answer if answers is None else rng.choice(answers)


def in_error_slice(problem: Problem) -> bool:
    """The slice of the addition task a biased warm start gets wrong: first operand ending in 7 (about 10%)."""
    if problem.task != "add":
        return False
    return problem.prompt.split("+", 1)[0].strip().endswith("7")


def slice_error_answer(problem: Problem) -> str:
    """The biased warm start's systematic mistake on :func:`in_error_slice`: the answer plus one."""
    return str(int(problem.answer) + 1)


def wrong_answer(problem: Problem, rng: random.Random, spec: TaskSpec | None = None) -> str:
    """A plausible wrong answer to ``problem`` (never equal to a correct answer)."""
    if problem.task == "between":
        return _wrong_between(problem.prompt, rng)
    if problem.task == "add":
        return _wrong_add(problem.answer, rng)
    if problem.task == "reverse":
        alphabet = "".join(sorted(set((spec or TaskSpec()).rev_alphabet)))
        return _wrong_reverse(problem.answer, rng, alphabet)
    raise ValueError(f"problem.task: unknown task {problem.task!r}")


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def _take(problems: list[Problem], n: int | None, seed: int, purpose: str) -> list[Problem]:
    if n is None or n >= len(problems):
        return list(problems)
    if n < 0:
        raise ValueError(f"n: expected a non-negative int or None, got {n}")
    return _rng(seed, purpose).sample(problems, n)


def sft_dataset(problems: list[Problem], seed: int = 0) -> Dataset:
    """Standard prompt-completion dataset: ``prompt``, ``completion`` (a correct answer, drawn uniformly for a
    many-answer task; no ``<eos>``)."""
    rng = _rng(seed, "sft-answers")
    return Dataset.from_dict({"prompt": [p.prompt for p in problems],
                              "completion": [sample_answer(p, rng) for p in problems]})


def preference_dataset(problems: list[Problem], seed: int = 0, spec: TaskSpec | None = None) -> Dataset:
    """Standard preference dataset: ``prompt``, ``chosen`` (correct), ``rejected`` (plausible wrong); no ``<eos>``."""
    rng = _rng(seed, "rejected")
    rejected = [wrong_answer(p, rng, spec) for p in problems]
    chosen_rng = _rng(seed, "chosen")
    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "chosen": [sample_answer(p, chosen_rng) for p in problems],
            "rejected": rejected,
        }
    )


def prompt_dataset(problems: list[Problem]) -> Dataset:
    """Prompt-only dataset for GRPO / PPO: ``prompt``, ``answer``, ``task``."""
    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "answer": [p.answer for p in problems],
            "task": [p.task for p in problems],
        }
    )


def tokenize_prompts(dataset: Dataset, tokenizer) -> Dataset:
    """Add an ``input_ids`` column (``<bos>`` + prompt, no padding) for trainers that take pre-tokenized prompts."""
    return dataset.map(lambda batch: {"input_ids": tokenizer(batch["prompt"])["input_ids"]}, batched=True)


def problems_from_dataset(dataset) -> list[Problem]:
    """Problems back from any dataset with a ``prompt`` column (answers recomputed when there is no ``answer``)."""
    prompts = list(dataset["prompt"])
    columns = getattr(dataset, "column_names", None) or list(dataset.keys())
    answers = list(dataset["answer"]) if "answer" in columns else [solve(p) for p in prompts]
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if answer is None:
            raise ValueError(f"dataset: prompt {prompt!r} has no answer column and is not a built-in task prompt")
        out.append(Problem(task_of(prompt) or "custom", prompt, answer))
    return out


@dataclass
class TaskDatasets:
    """All datasets of one ``(spec, seed)``: problem splits plus SFT / preference / prompt datasets per split."""

    spec: TaskSpec
    seed: int
    problems: dict[str, list[Problem]]
    sft: dict[str, Dataset] = field(default_factory=dict)
    preference: dict[str, Dataset] = field(default_factory=dict)
    prompts: dict[str, Dataset] = field(default_factory=dict)


def build_datasets(
    spec: TaskSpec | None = None,
    seed: int = 0,
    n_sft: int | None = None,
    n_preference: int | None = 2048,
    n_prompts: int | None = 2048,
) -> TaskDatasets:
    """Build every dataset of the task. ``n_*`` subsample the train split (None: all of it); held-out splits are
    used whole. Subsamples are deterministic in ``seed``."""
    spec = spec or TaskSpec()
    splits = make_splits(spec, seed)
    out = TaskDatasets(spec=spec, seed=seed, problems=splits)
    for name, problems in splits.items():
        is_train = name == "train"
        out.sft[name] = sft_dataset(_take(problems, n_sft, seed, "sft") if is_train else problems, seed=seed)
        out.preference[name] = preference_dataset(
            _take(problems, n_preference, seed, "preference") if is_train else problems, seed=seed, spec=spec
        )
        out.prompts[name] = prompt_dataset(_take(problems, n_prompts, seed, "prompts") if is_train else problems)
    return out
