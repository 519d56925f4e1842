"""Pseudo-label self-training (FixMatch-style confidence threshold, optional Mean-Teacher EMA) with the entropy term
on the pseudo-labelled examples, on the embedded addition task with a warm start that is wrong on a slice.

Each round: the teacher labels the unlabelled pool greedily, the labels whose sequence probability reaches the
threshold are kept, the student trains on the labelled set plus the kept labels (EntropySFTTrainer; the entropy
term only on the pseudo-labelled rows), and the round is measured. The math and the task: docs/formulations.md
("Pseudo-labels") and docs/embedded_default.md.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

TEACHERS = ("current", "ema")


@dataclass
class PseudoLabelSpec:
    """The recipe's ``pseudo_label`` section."""

    rounds: int = 5
    threshold: float = 0.9  # FixMatch's τ on the greedy answer's sequence probability
    labeled: int = 128  # labelled examples (correct answers)
    pool: int = 1024  # unlabelled prompts
    steps_per_round: int = 60
    teacher: str = "current"  # or "ema" (Mean Teacher)
    ema_decay: float = 0.5  # per round: teacher <- decay * teacher + (1 - decay) * student
    warm_start_accuracy: float = 0.7  # the biased warm start trains until this greedy accuracy
    eval_prompts: int = 512

    def __post_init__(self):
        for name in ("rounds", "labeled", "pool", "steps_per_round", "eval_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pseudo_label.{name}: expected a positive integer, got {value!r}")
        for name in ("threshold", "warm_start_accuracy"):
            if not 0.0 < float(getattr(self, name)) <= 1.0:
                raise ValueError(f"pseudo_label.{name}: expected a number in (0, 1], got {getattr(self, name)!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"pseudo_label.teacher: expected one of {TEACHERS}, got {self.teacher!r}")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"pseudo_label.ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def split_problems(seed: int, spec: PseudoLabelSpec):
    """``(labelled, pool, test)`` problems of the addition task (disjoint; labelled ones keep their answers)."""
    from .tasks.data import TaskSpec, make_splits

    splits = make_splits(TaskSpec(task="add"), seed)
    train = splits["train"]
    if spec.labeled + spec.pool > len(train):
        raise ValueError(f"pseudo_label: labeled + pool = {spec.labeled + spec.pool} exceeds the {len(train)} "
                         "training problems of the task")
    test = (splits["test"] + splits["validation"])[: spec.eval_prompts]
    return train[: spec.labeled], train[spec.labeled: spec.labeled + spec.pool], test


def greedy_answers(model, tokenizer, problems) -> tuple[list[str], list[float], list[float]]:
    """Greedy answers, their sequence probabilities (``<eos>`` included) and mean per-token entropies."""
    from .tasks.evaluation import generate_completions

    g = generate_completions(model, tokenizer, [p.prompt for p in problems], do_sample=False, max_new_tokens=6)
    confidence = [math.exp(sum(lp)) for lp in g.logprobs]
    entropy = [sum(h) / max(len(h), 1) for h in g.entropies]
    return [t.strip() for t in g.texts], confidence, entropy


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """ECE: the bin-weighted gap between mean confidence and accuracy over ``bins`` equal-width bins."""
    total, n = 0.0, len(confidence)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if idx:
            gap = abs(sum(confidence[i] for i in idx) / len(idx) - sum(correct[i] for i in idx) / len(idx))
            total += len(idx) / n * gap
    return total


def held_out(model, tokenizer, problems, threshold: float) -> dict[str, Any]:
    """Greedy accuracy (overall and on the error slice), ECE, mean entropy and the confident-and-wrong share."""
    from .tasks.data import in_error_slice

    answers, confidence, entropy = greedy_answers(model, tokenizer, problems)
    correct = [a == p.answer for a, p in zip(answers, problems)]
    in_slice = [in_error_slice(p) for p in problems]
    n_slice = max(sum(in_slice), 1)
    return {
        "accuracy": sum(correct) / len(correct), "reward": sum(correct) / len(correct),
        "slice_accuracy": sum(c for c, s in zip(correct, in_slice) if s) / n_slice,
        "ece": expected_calibration_error(confidence, correct),
        "entropy": sum(entropy) / len(entropy),
        "confident_wrong": sum((c >= threshold) and not ok for c, ok in zip(confidence, correct)) / len(correct),
        "mean_confidence": sum(confidence) / len(confidence),
        "num_prompts": len(problems), "per_prompt": {"reward": [float(c) for c in correct]},
    }


def label_pool(teacher, tokenizer, pool, threshold: float) -> tuple[list, dict[str, float]]:
    """The kept ``(problem, pseudo answer)`` pairs and the round's pseudo-label statistics."""
    from .tasks.data import in_error_slice

    answers, confidence, _ = greedy_answers(teacher, tokenizer, pool)
    kept = [(p, a) for p, a, c in zip(pool, answers, confidence) if c >= threshold]
    wrong = sum(a != p.answer for p, a in kept)
    slice_kept = [(p, a) for p, a in kept if in_error_slice(p)]
    return kept, {
        "coverage": len(kept) / len(pool),
        "pseudo_accuracy": (len(kept) - wrong) / len(kept) if kept else float("nan"),
        "confident_wrong_share": wrong / len(pool),
        "slice_confident_wrong_share": sum(a != p.answer for p, a in slice_kept) / max(
            sum(in_error_slice(p) for p in pool), 1),
    }


def _round_dataset(labeled, kept):
    from datasets import Dataset

    rows = [(p.prompt, p.answer, 0) for p in labeled] + [(p.prompt, a, 1) for p, a in kept]
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows],
                              "entropy_mask": [r[2] for r in rows]})


def _ema(teacher, student, decay: float) -> None:
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def _train_round(trainer_args: dict, model, tokenizer, dataset, out_dir: Path, round_index: int,
                 spec: PseudoLabelSpec, seed: int):
    from .trainers import EntropySFTConfig, EntropySFTTrainer

    args = {**trainer_args, "output_dir": str(out_dir / "rounds" / f"round-{round_index}"),
            "max_steps": spec.steps_per_round, "save_strategy": "no", "report_to": [], "disable_tqdm": True,
            "seed": seed + round_index, "overwrite_output_dir": True}
    trainer = EntropySFTTrainer(model=model, args=EntropySFTConfig(**args), train_dataset=dataset,
                                processing_class=tokenizer)
    trainer.train()
    history = [r for r in trainer.state.log_history if "loss" in r]
    return trainer.accelerator.unwrap_model(trainer.model), history


def run_pseudo_label(recipe: dict, trainer_args: dict, out_dir: Path, log=print) -> dict[str, Any]:
    """The self-training loop; ``trainer_args``: the EntropySFTConfig fields of every round's training. Writes
    ``rounds.jsonl`` (one record per round), ``metrics.jsonl`` and returns the summary (the caller writes
    ``summary.json``)."""
    from .tasks.tokenizer import build_tokenizer
    from .tasks.warmstart import default_warm_start_config, ensure_warm_start, load_warm_start

    spec = PseudoLabelSpec(**recipe["pseudo_label"])
    seed = recipe["seed"]
    labeled, pool, test = split_problems(seed, spec)
    config = default_warm_start_config("add", seed=seed, wrong_on_slice=True,
                                       target_accuracy=spec.warm_start_accuracy)
    path, cached = ensure_warm_start(config, log=None)
    log(f"pseudo-label task: warm start wrong on the slice ({'cached' if cached else 'trained'}) at {path}")
    student, _ = load_warm_start(path)
    tokenizer = build_tokenizer()
    teacher = copy.deepcopy(student) if spec.teacher == "ema" else None  # the current teacher is the student
    rounds_path, metrics_path = out_dir / "rounds.jsonl", out_dir / "metrics.jsonl"
    before = held_out(student, tokenizer, test, spec.threshold)
    records = [{"round": 0, **{k: v for k, v in before.items() if k != "per_prompt"}}]
    t0 = time.time()
    after = before
    for r in range(1, spec.rounds + 1):
        kept, stats = label_pool(teacher if spec.teacher == "ema" else student, tokenizer, pool, spec.threshold)
        student, history = _train_round(trainer_args, student, tokenizer, _round_dataset(labeled, kept), out_dir, r,
                                        spec, seed)
        if spec.teacher == "ema":
            _ema(teacher, student, spec.ema_decay)
        after = held_out(student, tokenizer, test, spec.threshold)
        record = {"round": r, **stats, **{k: v for k, v in after.items() if k != "per_prompt"},
                  "train_entropy": history[-1].get("entropy") if history else None}
        records.append(record)
        log(f"round {r}: coverage {stats['coverage']:.3f}, pseudo-label accuracy {stats['pseudo_accuracy']:.3f}, "
            f"confident-and-wrong {stats['confident_wrong_share']:.3f}; held-out accuracy {after['accuracy']:.3f} "
            f"(slice {after['slice_accuracy']:.3f}), ECE {after['ece']:.3f}")
    rounds_path.write_text("".join(json.dumps(x) + "\n" for x in records))
    metrics_path.write_text("".join(json.dumps({"step": x["round"], **x}) + "\n" for x in records))
    student.save_pretrained(out_dir / "final")
    tokenizer.save_pretrained(out_dir / "final")
    return {"recipe": recipe.get("source"), "algorithm": recipe["algorithm"], "steps": spec.rounds * spec.steps_per_round,
            "train_seconds": round(time.time() - t0, 1), "entropy_coef": recipe["trainer"].get("entropy_coef", 0.0),
            "pseudo_label": asdict(spec), "rounds": records, "train": {}, "held_out_before": before,
            "held_out_after": after, "output_dir": str(out_dir)}
