"""SFT warm start of the tiny model, cached on disk, so RL / DPO start from a policy that is partly right.

A plain-torch loop stops at a target greedy accuracy; the cache is written atomically under a per-key lock so that
concurrent ranks train once. Details: docs/embedded_default.md ("Warm start and its cache").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .data import (MANY_ANSWER_TASKS, Problem, TaskSpec, in_error_slice, make_splits, sample_answer,
                   slice_error_answer)
from .cache import build_once
from ..utils import package_version, torch_threads
from .evaluation import encode_supervised, evaluate, generate_completions
from .model import build_tiny_model
from .rewards import correctness_reward
from .tokenizer import build_tokenizer

#: Bump when the training procedure or the saved layout changes: old cache entries are then ignored.
FORMAT_VERSION = 1
MARKER = "warmstart.json"
CACHE_ENV = "LLM_ENTREG_CACHE"


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that determines the warm-started checkpoint (its hash is the cache key).

    Args:
        task: the :class:`TaskSpec` (default: addition of operands 0..99).
        seed: data split, model initialisation and batch order; default 0.
        arch, hidden_size, layers, heads, kv_heads, intermediate_size: the tiny model (see ``build_tiny_model``);
            default a 2-layer Qwen2 with width 64 and 4 heads (~165k parameters).
        max_steps: optimizer steps at most; default 3000.
        batch_size: sequences per step; default 64.
        lr: peak AdamW learning rate; default 3e-3 (tiny models like large rates). warmup_steps: default 50.
        weight_decay: default 0.0.
        target_accuracy: stop once greedy probe accuracy >= this (None: run ``max_steps``); default 0.4.
        eval_every: steps between probe evaluations; default 100. probe_size: probe prompts; default 128.
        wrong_on_slice: the SFT labels on :func:`~llm_entreg.tasks.data.in_error_slice` are the answer plus one, so
            the warm start is confidently wrong there (the pseudo-label task); default False.
    """

    task: TaskSpec = field(default_factory=TaskSpec)
    seed: int = 0
    arch: str = "qwen2"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    intermediate_size: int | None = None
    max_steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    target_accuracy: float | None = 0.4
    eval_every: int = 100
    probe_size: int = 128
    wrong_on_slice: bool = False

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "probe_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps!r}")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy: expected None or in (0, 1], got {self.target_accuracy!r}")

    def to_dict(self) -> dict:
        out = asdict(self)
        if not out["wrong_on_slice"]:  # absent, as before the field existed: earlier cache keys stay valid
            del out["wrong_on_slice"]
        return out

    def key(self) -> str:
        """Cache key: ``<arch>-<task>-<16 hex digits of the config hash>``."""
        payload = json.dumps({"format": FORMAT_VERSION, "config": self.to_dict()}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return f"{self.arch}-{self.task.task}-{digest}"


class WarmStart(NamedTuple):
    """Result of :func:`warm_start`: the loaded model and tokenizer, the checkpoint ``path`` (give it to a trainer
    as ``model=str(path)``), the marker ``info`` (config, metrics, timings) and whether it came ``from_cache``."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    info: dict
    from_cache: bool


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$LLM_ENTREG_CACHE``, else ``~/.cache/llm_entreg``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm_entreg"


def warm_start_dir(config: WarmStartConfig | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of ``config`` lives (whether or not it exists yet)."""
    config = config or WarmStartConfig()
    return cache_root(cache_dir) / "warmstart" / config.key()


def read_marker(path: str | os.PathLike) -> dict | None:
    """The parsed marker of a warm-start directory, or None if absent / unreadable / incomplete."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("complete") is True else None


def is_valid_warm_start(path: str | os.PathLike, config: WarmStartConfig | None = None) -> bool:
    """True when ``path`` holds a complete checkpoint (marker written last, model and tokenizer files present) and,
    if ``config`` is given, the marker's key matches it."""
    path = Path(path)
    info = read_marker(path)
    if info is None or info.get("format") != FORMAT_VERSION:
        return False
    if config is not None and info.get("key") != config.key():
        return False
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in required)





def _lr_at(step: int, config: WarmStartConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 10% of it at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


#: Answers drawn per training prompt of a many-answer task: the warm start learns the uniform distribution over them.
ANSWERS_PER_PROMPT = 8


def _probe_accuracy(model, tokenizer, probe, sampled: bool) -> float:
    """Greedy accuracy on the probe; for a many-answer task, sampled accuracy over 8 samples per prompt (the greedy
    answer of a policy spread over the correct answers says little about it)."""
    n = 8 if sampled else 1
    prompts = [p.prompt for p in probe for _ in range(n)]
    g = generate_completions(model, tokenizer, prompts, do_sample=sampled)
    scores = correctness_reward(prompts, g.texts, answer=[p.answer for p in probe for _ in range(n)])
    return sum(scores) / len(scores)


def _training_examples(train: list[Problem], task: TaskSpec, seed: int, wrong_on_slice: bool = False) -> list[Problem]:
    """The SFT examples: each problem with its answer, or, for a many-answer task, with uniformly drawn answers;
    with ``wrong_on_slice``, the slice's systematic mistake."""
    if wrong_on_slice:
        return [Problem(p.task, p.prompt, slice_error_answer(p)) if in_error_slice(p) else p for p in train]
    if task.task not in MANY_ANSWER_TASKS:
        return train
    rng = random.Random(f"llm_entreg.warmstart:{seed}")
    return [Problem(p.task, p.prompt, sample_answer(p, rng)) for p in train for _ in range(ANSWERS_PER_PROMPT)]


def default_warm_start_config(task: str | TaskSpec = "add", **overrides) -> WarmStartConfig:
    """The warm start a task gets by default: greedy accuracy 0.4 for single-answer tasks; for a many-answer task,
    sampled accuracy 0.55 checked every 25 steps (a policy spread over the correct answers, partly right)."""
    spec = task if isinstance(task, TaskSpec) else TaskSpec(task=task)
    base = dict(target_accuracy=0.55, eval_every=25) if spec.task in MANY_ANSWER_TASKS else {}
    return WarmStartConfig(task=spec, **{**base, **overrides})


def train_warm_start(config: WarmStartConfig, log=None):
    """Run the SFT warm start in memory (no cache). Returns ``(model, tokenizer, metrics)``."""
    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        arch=config.arch,
        hidden_size=config.hidden_size,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    splits = make_splits(config.task, config.seed)
    train = splits["train"]
    sampled_probe = config.task.task in MANY_ANSWER_TASKS
    examples = _training_examples(train, config.task, config.seed, config.wrong_on_slice)
    input_ids, labels = encode_supervised(tokenizer, examples)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    gen = torch.Generator().manual_seed(config.seed)
    probe_idx = torch.randperm(len(train), generator=gen)[: config.probe_size].tolist()
    probe = [train[i] for i in probe_idx]
    # Held-out statistics before training, for the record (and the tests).
    val_subset = splits["validation"][:128]
    before = evaluate(model, tokenizer, val_subset, sampled=False)

    optimizer = _adamw(model, config)
    model.train()
    losses: list[float] = []
    probe_history: list[tuple[int, float]] = []
    steps = 0
    stop_reason = "max_steps"
    for step in range(config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        idx = torch.randint(input_ids.shape[0], (config.batch_size,), generator=gen)
        losses.append(_supervised_step(model, optimizer, (input_ids, labels, attention_mask), idx))
        steps = step + 1
        if steps % config.eval_every == 0 or steps == config.max_steps:
            acc = _probe_accuracy(model, tokenizer, probe, sampled_probe)
            probe_history.append((steps, acc))
            if log is not None:
                window = losses[-config.eval_every :]
                log(f"warm start step {steps}: loss {sum(window) / len(window):.4f} probe accuracy {acc:.3f}")
            if config.target_accuracy is not None and acc >= config.target_accuracy:
                stop_reason = "target_accuracy"
                break
    model.eval()
    after = evaluate(model, tokenizer, val_subset, sampled=False)
    head = losses[: min(20, len(losses))]
    tail = losses[-min(20, len(losses)) :]
    metrics = {
        "steps": steps,
        "stop_reason": stop_reason,
        "initial_loss": sum(head) / len(head),
        "final_loss": sum(tail) / len(tail),
        "probe_history": probe_history,
        "validation_before": before,
        "validation_after": after,
        "train_seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    return model, tokenizer, metrics


def _adamw(model, config: WarmStartConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms and vectors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )


def _supervised_step(model, optimizer, data, idx: torch.Tensor) -> float:
    """One clipped AdamW step of next-token cross-entropy on the rows ``idx`` of ``data = (ids, labels, mask)``,
    cut to their longest row; the loss."""
    input_ids, labels, attention_mask = data
    width = int(attention_mask[idx].sum(1).max())
    ids, lab, am = input_ids[idx, :width], labels[idx, :width], attention_mask[idx, :width]
    logits = model(input_ids=ids, attention_mask=am).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def ensure_warm_start(
    config: WarmStartConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    num_threads: int | None = 1,
    log=None,
) -> tuple[Path, bool]:
    """Make sure the checkpoint of ``config`` is in the cache; train it if not. Returns ``(path, from_cache)``.

    ``force`` retrains even over a valid entry. ``num_threads`` sets torch's intra-op threads for the training only
    (restored afterwards; None leaves torch's setting alone). The default, 1, is the fastest for a model this small:
    its matrices are too small to gain from threads, and on a busy machine multi-threaded CPU kernels can be many times
    slower (measured: 150 steps took 6 s with 1 thread, 39-114 s with 2, on a 2-core machine under load).
    ``log`` is an optional ``print``-like callable for progress lines.
    """
    config = config or WarmStartConfig()
    final = warm_start_dir(config, cache_dir)

    def build(tmp: Path) -> dict:
        with torch_threads(num_threads):
            model, tokenizer, metrics = train_warm_start(config, log=log)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {
            "complete": True,
            "format": FORMAT_VERSION,
            "key": config.key(),
            "config": config.to_dict(),
            "metrics": metrics,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"torch": torch.__version__, "transformers": package_version("transformers")},
        }
    return build_once(final, lambda: is_valid_warm_start(final, config), build, MARKER, force)


def load_warm_start(path: str | os.PathLike):
    """``(model, tokenizer)`` loaded from a warm-start directory (model in eval mode, float32, on the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_valid_warm_start(path):
        raise ValueError(f"path: {str(path)!r} is not a complete warm-start checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def warm_start(
    config: WarmStartConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    num_threads: int | None = 1,
    log=None,
) -> WarmStart:
    """Warm-started ``(model, tokenizer, path, info, from_cache)``; trains and caches on first use only."""
    path, from_cache = ensure_warm_start(config, cache_dir, force=force, num_threads=num_threads, log=log)
    model, tokenizer = load_warm_start(path)
    return WarmStart(model, tokenizer, path, read_marker(path) or {}, from_cache)
