"""Launching through ``accelerate launch``: the accelerate configs shipped as package data, and the relaunch command
that ``llm-entreg train --accelerate-config`` and multi-process sweep trials both use."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from importlib.resources import files
from pathlib import Path

#: The package that holds the shipped accelerate configs (the repository's ``configs/``).
CONFIG_PACKAGE = "llm_entreg.configs"


#: Exit status of a run stopped by SIGTERM after saving a complete checkpoint (128 + 15, as the shell reports it).
PREEMPTED_EXIT = 143
#: TRL's names for its accelerate configs (``trl/accelerate_configs``) -> ours.
CONFIG_ALIASES = {"zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "multi_gpu": "multi_gpu_ddp",
                  "single_gpu": "single_gpu", "fsdp2": "fsdp2"}
#: The CPU stand-ins of the GPU configs, named when a GPU config is asked for on a machine without one.
CPU_EQUIVALENTS = {"deepspeed_zero2": "cpu_zero2_2proc", "deepspeed_zero3": "cpu_zero3_2proc",
                   "multi_gpu_ddp": "cpu_ddp_2proc", "fsdp2": "cpu_ddp_2proc", "single_gpu": "(no config: plain train)"}


class LaunchError(ValueError):
    """An accelerate config could not be found; the message names it and the known ones."""


def shipped_configs() -> dict[str, Path]:
    """The shipped accelerate configs by name (``cpu_ddp_2proc`` -> its path), from the installed package."""
    root = files(CONFIG_PACKAGE)
    return {Path(item.name).stem: Path(str(item)) for item in root.iterdir() if item.name.endswith(".yaml")}


def resolve_accelerate_config(name: str, gpus: int | None = None) -> Path:
    """A config file path, or the name of a shipped config (with or without ``.yaml``; TRL's ``zero2``, ``zero3``,
    ``multi_gpu``, ``fsdp2`` too). A shipped GPU config on a machine without a GPU is refused, naming the CPU one."""
    given = Path(str(name)).expanduser()
    if given.is_file():
        return given
    known = shipped_configs()
    stem = given.name[: -len(".yaml")] if given.name.endswith(".yaml") else given.name
    stem = CONFIG_ALIASES.get(stem, stem)
    if given.parent != Path(".") or stem not in known:
        raise LaunchError(f"--accelerate-config: no config {name!r} (not a file, not a shipped name); "
                          f"known names: {sorted(known)}, and TRL's {sorted(CONFIG_ALIASES)}")
    if stem in CPU_EQUIVALENTS:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if gpus == 0:
            raise LaunchError(f"--accelerate-config {name}: the shipped {stem} config needs GPUs and this machine has "
                              f"none; on CPUs use {CPU_EQUIVALENTS[stem]}")
    return known[stem]


def check_single_process_launch(env=None) -> None:
    """Refuse a run that ``accelerate launch --num_processes N`` (N > 1) started as one process: without GPUs or a
    config, accelerate's plain launcher runs a single process (it sets MASTER_ADDR but no WORLD_SIZE)."""
    env = os.environ if env is None else env
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise LaunchError(
            "accelerate launch was asked for several processes but started one (without GPUs or a config its plain "
            "launcher runs a single process). Add --multi_gpu (the ranks still run on the CPU when the recipe sets "
            "use_cpu: true), e.g. `accelerate launch --multi_gpu --num_processes 2 -m llm_entreg train RECIPE`, or "
            "run `llm-entreg train RECIPE --accelerate-config cpu_ddp_2proc`")


def accelerate_command(config: str | Path, args: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch --config_file CONFIG -m llm_entreg ARGS...``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "llm_entreg",
            *args]


def relaunch(config: str | Path, args: list[str], log=print) -> int:
    """Run ``llm_entreg ARGS`` under ``accelerate launch`` with ``config``; returns the launcher's exit code, or
    :data:`PREEMPTED_EXIT` after a SIGTERM. The launcher runs in its own process group; SIGTERM and SIGINT sent to
    this process are passed to that whole group once (launcher and ranks), and this process waits for it to end."""
    cmd = accelerate_command(config, args)
    log("launching: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return PREEMPTED_EXIT if signal.SIGTERM in received and code != 0 else code
