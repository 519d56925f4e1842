"""The embedded default: an offline, tiny, CPU-friendly RL task (tokenizer, model, data, rewards, evaluation).

``build_default(seed=0)`` gives a run everything it needs (a warm-started tiny model, cached); usage and figures:
docs/embedded_default.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .data import (
    MANY_ANSWER_TASKS,
    SPLITS,
    TASKS,
    Problem,
    TaskDatasets,
    TaskSpec,
    build_datasets,
    correct_answers,
    is_correct,
    make_splits,
    preference_dataset,
    problems_from_dataset,
    prompt_dataset,
    sample_answer,
    sft_dataset,
    solve,
    tokenize_prompts,
    wrong_answer,
)
from .evaluation import (
    Generations,
    encode_supervised,
    evaluate,
    generate_completions,
    reference_stats,
)
from .model import ARCHS, build_tiny_model, count_parameters, tiny_model_config
from .reward_model import (
    RewardModelConfig,
    build_reward_model,
    encode_texts,
    ensure_reward_model,
    is_valid_reward_model,
    load_reward_model,
    pairwise_accuracy,
    read_reward_marker,
    reward_model_dir,
    reward_model_key,
    score_texts,
    train_reward_model,
)
from .rewards import (
    REWARD_FUNCS,
    completion_text,
    correctness_reward,
    format_reward,
    get_reward_funcs,
    partial_credit_reward,
)
from .tokenizer import BOS_TOKEN, BYTE_OFFSET, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, build_tokenizer
from .warmstart import (
    CACHE_ENV,
    WarmStart,
    WarmStartConfig,
    cache_root,
    default_warm_start_config,
    ensure_warm_start,
    is_valid_warm_start,
    load_warm_start,
    read_marker,
    train_warm_start,
    warm_start,
    warm_start_dir,
)

__all__ = [
    "ARCHS",
    "BOS_TOKEN",
    "BYTE_OFFSET",
    "CACHE_ENV",
    "EOS_TOKEN",
    "EmbeddedDefault",
    "Generations",
    "PAD_TOKEN",
    "Problem",
    "REWARD_FUNCS",
    "RewardModelConfig",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TASKS",
    "TaskDatasets",
    "TaskSpec",
    "UNK_TOKEN",
    "WarmStart",
    "WarmStartConfig",
    "build_datasets",
    "build_default",
    "build_reward_model",
    "build_tiny_model",
    "build_tokenizer",
    "cache_root",
    "completion_text",
    "correctness_reward",
    "count_parameters",
    "encode_supervised",
    "encode_texts",
    "ensure_reward_model",
    "ensure_warm_start",
    "evaluate",
    "format_reward",
    "generate_completions",
    "get_reward_funcs",
    "is_valid_reward_model",
    "is_valid_warm_start",
    "load_reward_model",
    "load_warm_start",
    "make_splits",
    "pairwise_accuracy",
    "partial_credit_reward",
    "preference_dataset",
    "problems_from_dataset",
    "prompt_dataset",
    "read_marker",
    "read_reward_marker",
    "reference_stats",
    "reward_model_dir",
    "reward_model_key",
    "score_texts",
    "sft_dataset",
    "solve",
    "tiny_model_config",
    "tokenize_prompts",
    "train_reward_model",
    "train_warm_start",
    "warm_start",
    "warm_start_dir",
    "wrong_answer",
    "MANY_ANSWER_TASKS",
    "correct_answers",
    "is_correct",
    "sample_answer",
    "default_warm_start_config",
]


@dataclass
class EmbeddedDefault:
    """Everything a run on the embedded default needs. Built by :func:`build_default`.

    Attributes:
        seed: the seed of the data splits, the model initialisation and the warm start.
        task: the :class:`TaskSpec`.
        warm_start_config: the :class:`WarmStartConfig` whose checkpoint ``model_path`` holds.
        model_path: directory of the warm-started model and tokenizer (``from_pretrained``-loadable).
        tokenizer: the tokenizer (same as the one saved in ``model_path``).
        warm_start_info: the cache marker: config, warm-start metrics and timings.
        from_cache: whether the warm start was found in the cache (False: trained by this call).
        datasets: every split of every format (:class:`TaskDatasets`); shortcuts below.
        reward_funcs / reward_weights: for ``GRPOTrainer(reward_funcs=...)`` / ``GRPOConfig(reward_weights=...)``.
    """

    seed: int
    task: TaskSpec
    warm_start_config: WarmStartConfig
    model_path: str
    tokenizer: object
    warm_start_info: dict
    from_cache: bool
    datasets: TaskDatasets
    reward_funcs: list = field(default_factory=lambda: [correctness_reward])
    reward_weights: list[float] = field(default_factory=lambda: [1.0])

    # Shortcuts -------------------------------------------------------------------------------------------------
    @property
    def sft_train(self):
        return self.datasets.sft["train"]

    @property
    def sft_validation(self):
        return self.datasets.sft["validation"]

    @property
    def preference_train(self):
        return self.datasets.preference["train"]

    @property
    def preference_validation(self):
        return self.datasets.preference["validation"]

    @property
    def prompts_train(self):
        return self.datasets.prompts["train"]

    @property
    def prompts_validation(self):
        return self.datasets.prompts["validation"]

    @property
    def prompts_test(self):
        return self.datasets.prompts["test"]

    def problems(self, split: str = "validation") -> list[Problem]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return self.datasets.problems[split]

    def load_model(self):
        """A fresh copy of the warm-started model (float32, CPU, eval mode)."""
        return load_warm_start(self.model_path)[0]

    def evaluate(self, model, split: str = "validation", **kwargs) -> dict[str, float]:
        """:func:`evaluate` on a held-out split with this default's reward functions and weights (and, unless given,
        ``num_threads=1``: the fastest for the tiny model on a CPU)."""
        kwargs.setdefault("num_threads", 1)
        kwargs.setdefault("reward_funcs", self.reward_funcs)
        kwargs.setdefault("reward_weights", self.reward_weights)
        return evaluate(model, self.tokenizer, self.problems(split), **kwargs)


def build_default(
    seed: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    task: str | TaskSpec | None = None,
    warm_start_config: WarmStartConfig | None = None,
    reward_funcs=("correctness",),
    reward_weights=None,
    n_preference: int | None = 2048,
    n_prompts: int | None = 2048,
    num_threads: int | None = 1,
    force: bool = False,
    log=None,
) -> EmbeddedDefault:
    """Build the embedded default: warm start (cached), tokenizer, datasets, reward functions.

    Args:
        seed: data split, model init and warm start seed; default ``warm_start_config.seed`` or 0.
        cache_dir: cache root (default ``$LLM_ENTREG_CACHE`` or ``~/.cache/llm_entreg``).
        task: ``"add"`` / ``"reverse"`` / ``"mix"`` / ``"between"`` or a :class:`TaskSpec`; default the config's task
            or ``"add"``.
        warm_start_config: override the warm start (model size, steps, target accuracy ...); ``seed`` and ``task``,
            when given, replace the config's own. Default: :func:`default_warm_start_config` of the task.
        reward_funcs: names from :data:`REWARD_FUNCS` or callables; default correctness only.
        reward_weights: one weight per reward function; default all 1.0.
        n_preference, n_prompts: train-split sizes of the preference and prompt datasets (None: the whole split).
        num_threads: torch threads for the warm start only; default 1 (None: leave torch's setting alone).
        force: retrain the warm start even if cached.
        log: optional ``print``-like callable for warm-start progress.
    """
    if warm_start_config is None:
        config = default_warm_start_config(task if task is not None else "add")
    else:
        config = warm_start_config
        if task is not None:
            config = dataclasses.replace(config, task=task if isinstance(task, TaskSpec) else TaskSpec(task=task))
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    funcs = [REWARD_FUNCS[f] if isinstance(f, str) else f for f in _names_checked(reward_funcs)]
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights: expected {len(funcs)} weights, got {len(weights)}")

    path, from_cache = ensure_warm_start(config, cache_dir, force=force, num_threads=num_threads, log=log)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    datasets = build_datasets(config.task, config.seed, n_preference=n_preference, n_prompts=n_prompts)
    return EmbeddedDefault(
        seed=config.seed,
        task=config.task,
        warm_start_config=config,
        model_path=str(path),
        tokenizer=tokenizer,
        warm_start_info=read_marker(path) or {},
        from_cache=from_cache,
        datasets=datasets,
        reward_funcs=funcs,
        reward_weights=weights,
    )


def _names_checked(reward_funcs):
    if isinstance(reward_funcs, str) or callable(reward_funcs):
        reward_funcs = [reward_funcs]
    reward_funcs = list(reward_funcs)
    if not reward_funcs:
        raise ValueError("reward_funcs: need at least one reward function")
    unknown = [f for f in reward_funcs if isinstance(f, str) and f not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"reward_funcs: unknown {unknown}; expected names from {sorted(REWARD_FUNCS)}")
    return reward_funcs
