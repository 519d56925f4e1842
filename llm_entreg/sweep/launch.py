"""A sweep trial that runs under ``accelerate launch`` (several processes / GPUs per trial).

The sweep sets ``trial_fn`` to :func:`accelerate_run` when given ``--accelerate-config NAME``; the resolved trial
recipe carries the config name under ``launcher`` (so it is part of the trial's fingerprint). The trial writes its
recipe to ``<trial dir>/recipe.yaml`` and runs ``llm-entreg train`` on it through the launcher; ``summary.json`` and
``metrics.jsonl`` land in the trial directory as for an in-process trial.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from ..launch import accelerate_command, resolve_accelerate_config

ACCELERATE_TRIAL_FN = "llm_entreg.sweep.launch:accelerate_run"


def accelerate_run(recipe: dict, resume_from_checkpoint=None, log=print):
    config = resolve_accelerate_config(recipe["launcher"]["accelerate_config"])
    out_dir = Path(recipe["trainer"]["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in recipe.items() if k not in ("source", "launcher", "real_model")}
    path = out_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    cmd = accelerate_command(config, ["train", str(path)])
    if resume_from_checkpoint:
        cmd += ["--resume", str(resume_from_checkpoint)]
    log("launching: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out_dir / "launch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}: {' | '.join(tail)[:400]}")
    return None  # the runner reads summary.json from the trial directory
