"""Launching through ``accelerate launch``: the accelerate configs shipped as package data, and the relaunch command
that ``llm-entreg train --accelerate-config`` and multi-process sweep trials both use."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files
from pathlib import Path

#: The package that holds the shipped accelerate configs (the repository's ``configs/``).
CONFIG_PACKAGE = "llm_entreg.configs"


class LaunchError(ValueError):
    """An accelerate config could not be found; the message names it and the known ones."""


def shipped_configs() -> dict[str, Path]:
    """The shipped accelerate configs by name (``cpu_ddp_2proc`` -> its path), from the installed package."""
    root = files(CONFIG_PACKAGE)
    return {Path(item.name).stem: Path(str(item)) for item in root.iterdir() if item.name.endswith(".yaml")}


def resolve_accelerate_config(name: str) -> Path:
    """A config file path, or the name of a shipped config (with or without ``.yaml``)."""
    given = Path(str(name)).expanduser()
    if given.is_file():
        return given
    known = shipped_configs()
    stem = given.name[: -len(".yaml")] if given.name.endswith(".yaml") else given.name
    if given.parent == Path(".") and stem in known:
        return known[stem]
    raise LaunchError(f"--accelerate-config: no config {name!r} (not a file, not a shipped name); "
                      f"known names: {sorted(known)}")


def accelerate_command(config: str | Path, args: list[str]) -> list[str]:
    """``python -m accelerate.commands.launch --config_file CONFIG -m llm_entreg ARGS...``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "llm_entreg",
            *args]


def relaunch(config: str | Path, args: list[str], log=print) -> int:
    """Run ``llm_entreg ARGS`` under ``accelerate launch`` with ``config``; returns the launcher's exit code."""
    cmd = accelerate_command(config, args)
    log("launching: " + " ".join(cmd))
    return subprocess.call(cmd)
