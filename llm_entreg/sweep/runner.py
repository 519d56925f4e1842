"""Run a sweep's trials: :func:`run_trial` (skip a finished trial, resume from the last checkpoint, record a
failure) and the sequential loop. See docs/sweep.md ("Resume and failures").
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoints import newest_complete
from ..utils import torch_threads
from .grid import TrialSpec, trial_overrides
from .pick import trial_metrics
from .spec import SweepConfig, SweepError
from .store import METRICS_FILE, TRACEBACK_FILE, is_finished, read_metrics, read_trial, write_trial

TRIALS_DIR = "trials"


# ------------------------------------------------------------------------------------------------ trial settings
def resolve_trial_fn(fn: str | Callable) -> Callable:
    """The trial function: a callable as is, or ``"module:function"`` imported."""
    if callable(fn):
        return fn
    module, sep, name = str(fn).partition(":")
    if not sep:
        raise SweepError(f"--trial-fn: expected MODULE:FUNCTION, got {fn!r}")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SweepError(f"--trial-fn: cannot import {fn!r} ({exc})") from exc
    return obj


def trial_dir(config: SweepConfig, trial: TrialSpec) -> Path:
    return Path(config.out_dir) / TRIALS_DIR / trial.id


def trial_recipe(config: SweepConfig, trial: TrialSpec) -> dict:
    """The base recipe with the sweep's overrides, then the trial's axis values, writing into its own directory."""
    import copy

    if config.recipes and trial.id in config.recipes:
        return copy.deepcopy(config.recipes[trial.id])
    from ..recipes import RecipeError, load_recipe, trainer_fields

    try:
        recipe = load_recipe(config.base_recipe, [*config.overrides, *trial_overrides(trial, config.end_ratio)],
                             real=config.real)
    except RecipeError as exc:
        raise SweepError(f"trial {trial.id}: {exc}") from exc
    recipe["trainer"]["output_dir"] = str(trial_dir(config, trial))
    recipe["trainer"]["overwrite_output_dir"] = True  # a trial that failed before its first checkpoint starts over
    if config.accelerate_config:
        recipe["launcher"] = {"accelerate_config": config.accelerate_config}
    if "disable_tqdm" in trainer_fields(recipe["algorithm"]):
        recipe["trainer"].setdefault("disable_tqdm", True)  # the sweep has its own progress bar
    return recipe


def fingerprint(recipe: dict, trial_fn_name: str) -> str:
    """Hash of what decides a trial's result: the resolved recipe (not its paths) and the trial function."""
    payload = {k: v for k, v in recipe.items() if k not in ("source",)}
    payload["trainer"] = {k: v for k, v in recipe["trainer"].items() if k not in ("output_dir", "disable_tqdm", "overwrite_output_dir")}
    text = json.dumps({"recipe": payload, "fn": trial_fn_name}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_trial_dirs(config: SweepConfig) -> dict[str, str]:
    """Resolve and fingerprint every trial (an invalid recipe fails here, before anything runs); refuse a trial
    directory left by a sweep with other settings. The resolved recipes are kept in ``config.recipes``."""
    prints, recipes = {}, {}
    for trial in config.trials:
        recipes[trial.id] = trial_recipe(config, trial)
        fp = fingerprint(recipes[trial.id], config.trial_fn_name)
        record = read_trial(trial_dir(config, trial))
        if record is not None and record.get("fingerprint") not in (None, fp):
            raise SweepError(
                f"{trial_dir(config, trial)} holds a trial run with other settings (recipe, overrides or trial "
                f"function changed); use another --out, or delete that directory to rerun it"
            )
        prints[trial.id] = fp
    config.recipes = recipes
    return prints


def last_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``directory`` (one still being written when a worker died is
    skipped), or ``None``."""
    chosen, _ = newest_complete(directory)
    return str(chosen) if chosen else None


# ----------------------------------------------------------------------------------------------------- one trial
@contextlib.contextmanager
def output_to(path: Path, enabled: bool = True):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and logging too) to ``path``."""
    if not enabled:
        yield
        return
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def base_row(trial: TrialSpec) -> dict[str, Any]:
    """The part of a results row that is known before the trial runs: id, axis values, directory."""
    return {"id": trial.id, **trial.params(), "output_dir": f"{TRIALS_DIR}/{trial.id}"}


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 500 characters of it)."""
    message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}".rstrip(": ")


def start_record(config: SweepConfig, trial: TrialSpec, fp: str, checkpoint: str | None) -> dict[str, Any]:
    """The ``trial.json`` of a trial that starts now (status ``running``)."""
    return {"id": trial.id, "params": trial.params(),
            "overrides": [*config.overrides, *trial_overrides(trial, config.end_ratio)],
            "fingerprint": fp, "trial_fn": config.trial_fn_name, "status": "running", "resumed_from": checkpoint,
            "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def run_trial(config: SweepConfig, trial: TrialSpec, trial_fn: Callable | None = None,
              capture_output: bool = True) -> tuple[dict[str, Any], bool]:
    """Run (or reuse, or resume) one trial. Returns ``(row, reused)``; never raises for a failing trial."""
    fn = resolve_trial_fn(trial_fn or config.trial_fn)
    directory = trial_dir(config, trial)
    recipe = trial_recipe(config, trial)
    fp = fingerprint(recipe, config.trial_fn_name)
    record = read_trial(directory)
    if is_finished(record, fp):
        return record["row"], True
    checkpoint = last_checkpoint(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = start_record(config, trial, fp, checkpoint)
    started = record["started"]
    write_trial(directory, record)
    (directory / TRACEBACK_FILE).unlink(missing_ok=True)
    row = base_row(trial)
    try:
        with output_to(directory / "trial.log", capture_output), torch_threads(config.threads):
            summary = fn(recipe, resume_from_checkpoint=checkpoint, log=print)
        if not isinstance(summary, dict):
            try:
                summary = json.loads((directory / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
        history = read_metrics(directory / METRICS_FILE)
        row.update(status="complete", **trial_metrics(summary, history, config.thresholds), error=None)
        if not config.keep_checkpoints:
            for ckpt in directory.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not the end of the sweep
        row.update(status="failed", error=error_text(exc))
        (directory / TRACEBACK_FILE).write_text(traceback.format_exc())
    finally:
        if time.time() - started > 5:  # free a real trial's model before the next; ~1 s, so not after instant ones
            gc.collect()
    row["seconds"] = round(time.time() - started, 1)
    row["resumed_from"] = Path(checkpoint).name if checkpoint else None
    record.update(status=row["status"], finished=time.time(), seconds=row["seconds"], row=row, error=row.get("error"))
    write_trial(directory, record)
    return row, False


# ------------------------------------------------------------------------------------------------------ progress
def status_line(row: dict, reused: bool = False, done: int | None = None, total: int | None = None) -> str:
    """One line per finished trial: reward, NLL, entropy first -> last window, flags, time."""
    head = f"[{done}/{total}] " if done is not None else ""
    if row.get("status") != "complete":
        return f"{head}{row['id']}: {row.get('status', '?').upper()} {row.get('error') or ''}".rstrip()
    parts = [f"{head}{row['id']}:"]
    if row.get("val_reward") is not None:
        parts.append(f"reward {row['val_reward']:.4g}")
    if row.get("val_nll") is not None:
        parts.append(f"nll {row['val_nll']:.4g}")
    if row.get("entropy_first") is not None and row.get("entropy_last") is not None:
        parts.append(f"H {row['entropy_first']:.3g}->{row['entropy_last']:.3g}")
    flags = [name for name in ("collapsed", "never_committed") if row.get(name)]
    if flags:
        parts.append("[" + ",".join(flags) + "]")
    parts.append("(reused)" if reused else f"({row.get('seconds', 0):.0f} s" + (f", resumed from {row['resumed_from']})"
                                                                               if row.get("resumed_from") else ")"))
    return " ".join(parts)


class Progress:
    """A tqdm bar over trials plus one printed line per finished trial."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = tqdm(total=total, desc="sweep", unit="trial", disable=not enabled, file=sys.stderr, leave=True)

    def finished(self, row: dict, reused: bool = False) -> None:
        self.done += 1
        self.bar.update(1)
        line = status_line(row, reused, self.done, self.total)
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------------ the sweep
def run_sequential(config: SweepConfig, trial_fn: Callable | None = None) -> None:
    """Every trial in this process, one after another."""
    progress = Progress(len(config.trials), config.progress)
    try:
        for trial in config.trials:
            row, reused = run_trial(config, trial, trial_fn)
            progress.finished(row, reused)
    finally:
        progress.close()
