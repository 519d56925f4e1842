"""Build a run from a validated recipe (model, data, trainer), train it, and write the run's record.

The output directory gets ``metrics.jsonl`` (every logged step), ``curves.png`` (loss, entropy, coefficient and
reward curves), ``summary.json`` and the trainer's own checkpoints. Resume, overwrite and SIGTERM: lifecycle.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .lifecycle import (
    Preempted, RunError, StopOnSignal, changed_settings, clear_run, resolve_resume, resumed_step, run_contents,
    trim_metrics,
)
from .utils import torch_threads, window_means, window_size

__all__ = ["Preempted", "RunError", "build", "format_summary", "held_out_metrics", "make_trainer", "run"]

# TRL's DPOTrainer also takes the "implicit prompt" format (the prompt inside chosen/rejected), so prompt is optional
PREFERENCE_COLUMNS = ("chosen", "rejected")
PROMPT_COLUMNS = ("prompt",)
#: SFT takes TRL's formats: prompt + completion, messages, or text; the check asks for the one column they all need
#: least, and TRL's own preparation names a missing partner
DEMONSTRATION_COLUMNS = ()


def _algorithm_inputs(algorithm: str) -> str:
    from .trainers import ALGORITHMS

    return ALGORITHMS[algorithm].inputs


def _columns(algorithm: str) -> tuple[str, ...]:
    return {"preferences": PREFERENCE_COLUMNS, "rewards": PROMPT_COLUMNS,
            "demonstrations": DEMONSTRATION_COLUMNS}[_algorithm_inputs(algorithm)]


def _embedded_split(default, algorithm: str, split: str):
    kind = _algorithm_inputs(algorithm)
    return {"preferences": default.datasets.preference, "rewards": default.datasets.prompts,
            "demonstrations": default.datasets.sft}[kind][split]


def resolve_reward_funcs(spec: dict, default=None) -> tuple[list, list[float] | None]:
    """Reward functions from names (the embedded task's) or ``package.module:function`` import paths, plus an
    optional reward model (a path or hub id TRL loads as a sequence classifier, or ``embedded``: a tiny reward model
    trained on the embedded preferences with TRL's RewardTrainer, cached)."""
    import importlib

    from .tasks import REWARD_FUNCS

    funcs = []
    for name in spec.get("funcs") or []:
        if callable(name):
            funcs.append(name)
        elif ":" in str(name):
            module, _, attr = str(name).partition(":")
            try:
                funcs.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"rewards.funcs: cannot import {name!r} ({exc})") from exc
        elif name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
        else:
            raise ValueError(f"rewards.funcs: unknown {name!r}; use one of {sorted(REWARD_FUNCS)} or module:function")
    reward_model = spec.get("reward_model")
    if reward_model == "embedded":
        if default is None:
            raise ValueError("rewards.reward_model: 'embedded' needs the embedded default (model or data 'embedded')")
        from .tasks import ensure_reward_model

        path, _ = ensure_reward_model(default)
        funcs.append(str(path))
    elif reward_model:
        path = os.path.expanduser(str(reward_model))
        if _looks_local(str(reward_model)) and not os.path.isdir(path):
            raise FileNotFoundError(f"rewards.reward_model: {reward_model!r} does not exist (no such directory)")
        funcs.append(path)
    if not funcs:
        raise ValueError("rewards.funcs: a GRPO/PPO recipe needs at least one reward function or a reward_model")
    weights = spec.get("weights")
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"rewards.weights: expected {len(funcs)} weights, got {len(weights)}")
    return funcs, weights


class MetricsWriter(TrainerCallback):
    """Appends every log record to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}) + "\n")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/") and name.count("/") > 1


def _load_model(name: str, field: str, dtype=None):
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(name)
    if _looks_local(name) and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}: {name!r} does not exist (no such directory)")
    if dtype and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"model.dtype: {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(
            f"{field}: could not load {name!r}: it is not a local model directory and the hub did not provide it "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.expanduser(name))


def _load_dataset(name: str, split: str, field: str, columns, limit):
    import datasets

    try:
        if os.path.isfile(name):
            ext = Path(name).suffix.lstrip(".")
            ext = {"jsonl": "json"}.get(ext, ext)
            ds = datasets.load_dataset(ext, data_files=name, split="train")  # a file is one split, whatever its name
        elif os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear message
        raise FileNotFoundError(f"{field}: could not load dataset {name!r} split {split!r}: {exc}") from exc
    return _check_columns(ds, columns, f"{field} ({name!r})", limit)


def _check_columns(ds, columns, what: str, limit):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; it has {ds.column_names}")
    if limit:
        ds = ds.select(range(min(int(limit), len(ds))))
    return ds


def build(recipe: dict, log=print) -> dict[str, Any]:
    """Resolve the recipe's model, tokenizer and datasets. Returns the pieces the trainer needs."""
    seed = recipe["seed"]
    data, model_cfg = recipe["data"], recipe["model"]
    pieces: dict[str, Any] = {"default": None}
    uses_embedded = model_cfg["name_or_path"] == "embedded" or data["train"] == "embedded"
    if uses_embedded:
        from .tasks import build_default

        t0 = time.time()
        default = build_default(seed=seed, task=data.get("task"), log=None)
        pieces["default"] = default
        how = "cached" if default.from_cache else f"trained in {time.time() - t0:.0f} s"
        log(f"embedded default: warm-started tiny model ({how}) at {default.model_path}")
    name = pieces["default"].model_path if model_cfg["name_or_path"] == "embedded" else model_cfg["name_or_path"]
    pieces["model"] = _load_model(name, "model.name_or_path", model_cfg.get("dtype"))
    pieces["tokenizer"] = _load_tokenizer(name)
    algorithm = recipe["algorithm"]
    columns = _columns(algorithm)
    ref = model_cfg.get("ref_name_or_path")
    if _algorithm_inputs(algorithm) == "rewards":
        pieces["ref_model"] = None  # TRL's GRPOTrainer builds its own reference when beta != 0
        pieces["reward_funcs"], pieces["reward_weights"] = resolve_reward_funcs(recipe["rewards"], pieces["default"])
    elif _algorithm_inputs(algorithm) == "demonstrations":
        pieces["ref_model"] = None  # SFT has no reference
    elif ref is None:
        import copy

        pieces["ref_model"] = copy.deepcopy(pieces["model"])
    else:
        pieces["ref_model"] = _load_model(pieces["default"].model_path if ref == "embedded" else ref,
                                          "model.ref_name_or_path", model_cfg.get("dtype"))
    limit_train, limit_eval = data.get("max_train_samples"), data.get("max_eval_samples")
    if data["train"] == "embedded":
        pieces["train"] = _check_columns(_embedded_split(pieces["default"], algorithm, data["train_split"]),
                                         columns, "data.train (embedded)", limit_train)
    else:
        pieces["train"] = _load_dataset(data["train"], data["train_split"], "data.train", columns, limit_train)
    pieces["eval"] = None
    if data.get("eval") == "embedded":
        pieces["eval"] = _check_columns(_embedded_split(pieces["default"], algorithm, data["eval_split"]),
                                        columns, "data.eval (embedded)", limit_eval)
    elif data.get("eval"):
        pieces["eval"] = _load_dataset(data["eval"], data["eval_split"], "data.eval", columns, limit_eval)
    return pieces


def held_out_metrics(recipe: dict, pieces: dict, model, reference=None, num_prompts: int | None = None,
                     num_samples: int | None = None) -> dict | None:
    """The embedded default's held-out evaluation of ``model`` (None without one); with ``reference``, also the KL
    of the policy to it on the sampled tokens."""
    ev = recipe["evaluation"]
    if not ev.get("held_out") or pieces["default"] is None:
        return None
    default = pieces["default"]
    problems = default.problems(ev["split"])[: int(num_prompts or ev["num_prompts"])]
    from .tasks import evaluate

    was_training = model.training
    metrics = evaluate(model, default.tokenizer, problems, reward_funcs=default.reward_funcs,
                       reward_weights=default.reward_weights, max_new_tokens=int(ev["max_new_tokens"]),
                       num_samples=int(num_samples or ev["num_samples"]), seed=recipe["seed"], reference=reference)
    model.train(was_training)
    return metrics


class HeldOutCurve(TrainerCallback):
    """Every ``evaluation.curve_every`` optimizer steps, the held-out pass@k, distinct correct answers, entropy and KL
    to the starting policy on ``evaluation.curve_prompts`` prompts, appended to ``metrics.jsonl`` as ``held_out/*``
    records (every rank evaluates, so sharded models work; the main process writes)."""

    def __init__(self, recipe: dict, pieces: dict, path: Path, reference):
        self.recipe, self.pieces, self.path, self.reference = recipe, pieces, Path(path), reference
        self.every = int(recipe["evaluation"].get("curve_every") or 0)
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every or self.trainer is None:
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        ev = self.recipe["evaluation"]
        m = held_out_metrics(self.recipe, self.pieces, model, self.reference, ev["curve_prompts"], ev["num_samples"])
        if m is None or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **{f"held_out/pass@{k}": v for k, v in m.get("pass_at_k", {}).items()}}
        for key in ("entropy", "distinct_correct", "reward", "kl_to_reference"):
            if key in m:
                record[f"held_out/{key}"] = m[key]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def make_trainer(recipe: dict, pieces: dict, callbacks=()):
    """The recipe's trainer (from :data:`llm_entreg.trainers.ALGORITHMS`) on the pieces :func:`build` resolved."""
    from .trainers import ALGORITHMS

    from .recipes import trainer_arguments

    algorithm = ALGORITHMS[recipe["algorithm"]]
    trainer_args = trainer_arguments(recipe)
    inputs = {"model": pieces["model"], "args": None, "train_dataset": pieces["train"], "eval_dataset": pieces["eval"],
              "processing_class": pieces["tokenizer"], "callbacks": list(callbacks)}
    if algorithm.inputs == "rewards":
        if pieces.get("reward_weights") is not None:
            trainer_args.setdefault("reward_weights", pieces["reward_weights"])
        inputs["reward_funcs"] = pieces["reward_funcs"]
    elif algorithm.inputs == "preferences":
        inputs["ref_model"] = pieces["ref_model"]
    inputs["args"] = algorithm.config(**trainer_args)
    return algorithm.trainer(**inputs)


def run(recipe: dict, resume_from_checkpoint=None, log=print, callbacks=()) -> dict[str, Any]:
    """Train the recipe end to end. Returns the summary (also written to ``summary.json``).

    ``resume_from_checkpoint``: None (the recipe's ``trainer.resume_from_checkpoint``, else a new run), True (the
    newest complete checkpoint in ``output_dir``) or a checkpoint directory. Raises :class:`Preempted` after SIGTERM
    (a complete checkpoint was saved) and :class:`RunError` for a used ``output_dir`` or nothing to resume.
    """
    # The embedded model is ~165k parameters: its matmuls are too small to gain from threads, and on a busy machine
    # extra threads cost 10-30x (measured by the sweep; docs/benchmarks.md)
    with torch_threads(1 if recipe["model"]["name_or_path"] == "embedded" else None), StopOnSignal() as stopper:
        return _run(recipe, resume_from_checkpoint, log, stopper, list(callbacks))


def _start_record(recipe: dict, out_dir: Path, checkpoint: str | None, replaced: list[str], log) -> None:
    """Main process: clear an overwritten run, note changed settings on resume, write the resolved recipe and trim
    ``metrics.jsonl`` to the resumed step."""
    if replaced:
        clear_run(out_dir, replaced, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = out_dir / "recipe.resolved.yaml"
    step = resumed_step(checkpoint)
    if checkpoint is not None and resolved.exists():
        import yaml

        changes = changed_settings(yaml.safe_load(resolved.read_text()) or {}, _plain(recipe))
        if changes:
            kept = out_dir / f"recipe.resolved.until-step-{step}.yaml"
            resolved.replace(kept)
            log(f"resume: settings changed since the checkpoint (the earlier ones: {kept.name}):\n  "
                + "\n  ".join(changes))
    resolved.write_text(_dump_yaml(recipe))
    if step is not None:
        dropped = trim_metrics(out_dir / "metrics.jsonl", step)
        if dropped:
            log(f"resume: metrics.jsonl: dropped {dropped} record(s) logged after step {step}")


def _run(recipe: dict, resume_from_checkpoint, log, stopper: StopOnSignal, callbacks: list) -> dict[str, Any]:
    out_dir = Path(recipe["trainer"]["output_dir"])
    requested = resume_from_checkpoint
    if requested is None:
        requested = recipe["trainer"].get("resume_from_checkpoint")  # TRL's field, as `trl dpo` honours it
    if recipe.get("pseudo_label") and requested not in (None, False):
        raise RunError("resume: the pseudo-label loop has no checkpoints to resume; run it again (it is minutes "
                       "on a CPU) with overwrite_output_dir=true")
    checkpoint = resolve_resume(out_dir, requested, log)
    replaced = run_contents(out_dir) if checkpoint is None else []
    if replaced and not recipe["trainer"].get("overwrite_output_dir"):
        shown = ", ".join(replaced[:6]) + (", ..." if len(replaced) > 6 else "")
        raise RunError(f"output_dir {out_dir} already holds a run ({shown}); continue it with --resume, replace "
                       "it with overwrite_output_dir=true, or choose another output_dir=...")
    if recipe.get("pseudo_label"):
        return _run_pseudo_label(recipe, out_dir, replaced, log)
    pieces = build(recipe, log=log)
    embedded_model = recipe["model"]["name_or_path"] == "embedded" and recipe["evaluation"].get("held_out")
    start = pieces["default"].load_model() if embedded_model else None  # the policy before training (for its KL)
    before = held_out_metrics(recipe, pieces, pieces["model"])
    metrics_path = out_dir / "metrics.jsonl"
    curve = HeldOutCurve(recipe, pieces, metrics_path, start)
    trainer = make_trainer(recipe, pieces, callbacks=[MetricsWriter(metrics_path), curve, stopper, *callbacks])
    curve.trainer = stopper.trainer = trainer
    trainer.accelerator.wait_for_everyone()  # every rank checked output_dir before the main one writes to it
    if trainer.is_world_process_zero():
        _start_record(recipe, out_dir, checkpoint, replaced, log)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint, checkpoint_verified=True)  # resolve_resume checked it
    train_seconds = time.time() - t0
    if stopper.stopped_at is not None:
        raise Preempted(stopper.stopped_at, str(out_dir / f"checkpoint-{stopper.stopped_at}"))
    trainer.save_model(str(out_dir / "final"))
    after = held_out_metrics(recipe, pieces, trainer.accelerator.unwrap_model(trainer.model), start)
    history = [r for r in trainer.state.log_history if "loss" in r]
    summary = {
        "recipe": recipe.get("source"),
        "algorithm": recipe["algorithm"],
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "resumed_from": checkpoint,
        "entropy_coef": recipe["trainer"].get("entropy_coef", 0.0),
        "train": curve_summary(history),
        "held_out_before": before,
        "held_out_after": after,
        "output_dir": str(out_dir),
    }
    if trainer.is_world_process_zero():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from .plots import plot_training_curves
        from .sweep.store import read_metrics

        records = read_metrics(metrics_path)
        plot_training_curves([r for r in records if "loss" in r], out_dir / "curves.png",
                             title=Path(recipe.get("source") or "run").stem, algorithm=recipe["algorithm"],
                             held_out_curve=[r for r in records if any(k.startswith("held_out/") for k in r)],
                             before=before, after=after)
    return summary


def _run_pseudo_label(recipe: dict, out_dir: Path, replaced: list[str], log) -> dict[str, Any]:
    """The pseudo-label self-training loop (an sft recipe with a ``pseudo_label`` section)."""
    from .plots import plot_pseudo_label_rounds
    from .pseudo_label import run_pseudo_label
    from .recipes import trainer_arguments

    _start_record(recipe, out_dir, None, replaced, log)
    summary = run_pseudo_label(recipe, trainer_arguments(recipe), out_dir, log)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_pseudo_label_rounds(summary["rounds"], out_dir / "curves.png", title=Path(recipe.get("source") or "").stem)
    return summary


#: Logged keys the summary reports, with their labels.
SUMMARY_KEYS = {
    "entropy": "entropy (train, nats/token)", "loss": "loss", "entropy_coef": "entropy coefficient",
    "rewards/accuracies": "DPO reward accuracy", "rewards/margins": "DPO reward margin",
    "rewards/chosen": "DPO implicit reward, chosen (β·log π/π_ref)", "logps/chosen": "log-prob of chosen",
    "reward": "mean reward (train)", "kl": "KL to reference (train)", "value_loss": "critic value loss",
    "explained_variance": "critic explained variance",
}


def curve_summary(history: list[dict], window: float = 0.2) -> dict[str, Any]:
    """For each logged key: the mean over the first and the last ``window`` fraction of its logged steps (at
    least one record each), so one noisy step does not stand for the run."""
    out = {}
    for key in SUMMARY_KEYS:
        values = [float(r[key]) for r in history if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        first, last = window_means(values, window)
        out[key] = {"first": first, "last": last, "n_window": window_size(len(values), window),
                    "n_logged": len(values)}
    return out


def _plain(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k != "real_model"}


def _dump_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(_plain(recipe), sort_keys=False)


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['train_seconds']} s -> {summary['output_dir']}"]
    train = summary["train"]
    if train:
        n = max(part["n_window"] for part in train.values())
        lines.append(f"  training curves, mean of the first -> last {n} logged step(s) (20% windows):")
    for key, label in SUMMARY_KEYS.items():
        if key in train and key != "logps/chosen":
            lines.append(f"    {label}: {train[key]['first']:.4g} -> {train[key]['last']:.4g}")
    before, after = summary.get("held_out_before"), summary.get("held_out_after")
    if before and after:
        lines.append("  held-out prompts, before -> after:")
        for key, label in (("accuracy", "accuracy (greedy)"), ("sampled_accuracy", "accuracy (sampled)"),
                           ("entropy", "policy entropy (sampled tokens)"), ("nll", "NLL of correct answers"),
                           ("distinct_correct", "distinct correct answers per prompt")):
            if key in before and key in after:
                lines.append(f"    {label}: {before[key]:.4g} -> {after[key]:.4g}")
        for k in after.get("pass_at_k", {}):
            if k in before.get("pass_at_k", {}):
                n = int(after.get("num_samples", 0))
                lines.append(f"    pass@{k} ({n} samples per prompt): {before['pass_at_k'][k]:.4g} -> "
                             f"{after['pass_at_k'][k]:.4g}")
        if "kl_to_reference" in after:
            lines.append(f"    KL to the starting policy (sampled tokens): {after['kl_to_reference']:.4g}")
    for r in summary.get("rounds", [])[1:]:  # the pseudo-label loop
        lines.append(f"  round {r['round']}: pool coverage {r['coverage']:.3g}, confident-and-wrong "
                     f"{r['confident_wrong_share']:.3g}; held-out accuracy {r['accuracy']:.3g} (slice "
                     f"{r['slice_accuracy']:.3g}), ECE {r['ece']:.3g}")
    return "\n".join(lines)
