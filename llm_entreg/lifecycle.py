"""A run's life around the trainer: which checkpoint to resume, an output directory never silently overwritten,
SIGTERM turned into a checkpoint at the next step boundary, and a ``metrics.jsonl`` without duplicate steps."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .checkpoints import CheckpointError, checkpoint_dirs, checkpoint_step, newest_complete, verify_checkpoint

#: What a run writes into its output directory: their presence means the directory holds a run.
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "recipe.resolved.yaml", "final", "runs")


class RunError(ValueError):
    """The run cannot start as asked (a used output directory, nothing to resume); the message says what to do."""


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after saving a complete checkpoint."""

    def __init__(self, step: int, checkpoint: str):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by SIGTERM at step {step}: the complete checkpoint {checkpoint} was saved; "
                         "run the same command with --resume to continue")


def run_contents(out_dir: Path) -> list[str]:
    """The run files and checkpoints in ``out_dir`` (empty if it holds no run)."""
    if not out_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    return found + [p.name for p in reversed(checkpoint_dirs(out_dir))]


def clear_run(out_dir: Path, found: list[str], log=print) -> None:
    """``overwrite_output_dir``: delete the earlier run's files and checkpoints (``found``); other files stay."""
    for name in found:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log(f"overwrite_output_dir: removed the earlier run in {out_dir} ({', '.join(found)})")


def resolve_resume(out_dir: Path, requested: Any, log=print) -> str | None:
    """The checkpoint directory to resume from: ``requested`` is None/False (no resume), True (the newest complete
    one in ``out_dir``; newer incomplete ones are skipped and named) or a path (checked file by file)."""
    if requested is None or requested is False:
        return None
    if requested is True:
        chosen, skipped = newest_complete(out_dir)
        for folder, why in skipped:
            log(f"resume: skipping {folder}: {why}")
        if chosen is None:
            raise RunError(f"resume: no complete checkpoint in {out_dir}"
                           + (f" (skipped {len(skipped)} incomplete)" if skipped else "")
                           + "; start a new run without --resume")
        requested = str(chosen)
    if not Path(requested).is_dir():
        raise RunError(f"resume_from_checkpoint: {requested} is not a directory")
    verify_checkpoint(requested)
    log(f"resume: from {requested}")
    return str(requested)


def trim_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to ``step`` (where the resumed checkpoint was saved), minus the closing record
    of the interrupted run; returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("step", 0) > step or "train_runtime" in record:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return dropped


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "real_model":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(before: dict, after: dict) -> list[str]:
    """``key: old -> new`` for every recipe key that differs (``source`` and resume fields aside)."""
    ignore = {"source", "trainer.resume_from_checkpoint"}
    old, new = _flatten(before), _flatten(after)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key not in ignore and old.get(key) != new.get(key)]


def resumed_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    step = checkpoint_step(checkpoint)
    if step is None:
        try:
            step = int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{checkpoint}: no step in its name or trainer_state.json") from exc
    return step


class StopOnSignal(TrainerCallback):
    """SIGTERM (what schedulers send before a kill) finishes the current optimizer step, saves a complete
    checkpoint and stops training. Ranks agree through a sum of their flags at every step end."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals, self.received, self.stopped_at, self.trainer, self._previous = signals, False, None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
            flag = bool(total.item() > 0)
        if flag:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
