"""Launched by the tests in this folder (through ``accelerate launch``, or plainly for the 1-process reference).

Runs ``llm-entreg train RECIPE overrides...`` in-process (the same path the CLI takes after its re-launch) with one
extra debug callback: every rank writes ``<output_dir>/probe/rank<R>.jsonl`` with the world size it ran in, the
coefficient used at each optimizer step, the coefficient state after it, and the global counts the normalizer saw.
Debug code for the tests only; nothing here is library code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

import llm_entreg.run as run_module
from llm_entreg.cli import exit_process, main


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class RankProbe(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.used = None

    def _write(self, args, record):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        path = Path(args.output_dir) / "probe" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "world_size": world, "num_processes": self.trainer.accelerator.num_processes,
                  "distributed_type": str(self.trainer.accelerator.distributed_type), "pid": os.getpid(), **record}
        with path.open("a") as f:
            f.write(json.dumps(_plain(record)) + "\n")

    def on_step_begin(self, args, state, control, **kwargs):
        self.used = None

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before the library's own step callback (added after ours): this is the coefficient of this step
        counts = self.trainer._entropy_window_counts
        self._write(args, {"event": "step", "step": state.global_step, "coef_used": self.trainer.entropy_coefficient.value,
                           "window_counts": [float(c) for c in counts] if counts is not None else None,
                           # this rank's own share of the step's tokens (not yet reset by the library's callback)
                           "local_tokens": float(self.trainer._entropy_step_stats[1])})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write(args, {"event": "log", "step": state.global_step,
                           "coef_state": self.trainer.entropy_coefficient.state_dict(),
                           "coef_next": self.trainer.entropy_coefficient.value})


def _with_probe(make_trainer):
    def wrapped(recipe, pieces, callbacks=()):
        probe = RankProbe()
        trainer = make_trainer(recipe, pieces, callbacks=[*callbacks, probe])
        probe.trainer = trainer
        return trainer

    return wrapped


if __name__ == "__main__":
    run_module.make_trainer = _with_probe(run_module.make_trainer)
    exit_process(main(["train", *sys.argv[1:]]))
