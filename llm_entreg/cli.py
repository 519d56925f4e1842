"""``llm-entreg``: parse, build, launch. No math here.

    llm-entreg train RECIPE.yaml [key=value ...] [--real] [--resume [CKPT]] [--accelerate-config NAME]
    llm-entreg bench [--quick] [bench options]
    accelerate launch --config_file configs/cpu_ddp_2proc.yaml -m llm_entreg train RECIPE.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def resolve_accelerate_config(name: str) -> Path:
    """A config path, or a name under the repository's ``configs/`` (with or without ``.yaml``)."""
    candidates = [Path(name), REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    raise SystemExit(f"--accelerate-config: no config {name!r}; known names: {known}")


def _train(args, raw: list[str]) -> int:
    if args.accelerate_config:
        config = resolve_accelerate_config(args.accelerate_config)
        forwarded, skip = [], False
        for item in raw:  # drop "--accelerate-config NAME" / "--accelerate-config=NAME"; forward the rest
            if skip:
                skip = False
            elif item == "--accelerate-config":
                skip = True
            elif not item.startswith("--accelerate-config="):
                forwarded.append(item)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "-m", "llm_entreg", "train", *forwarded]
        print("launching:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)

    from .recipes import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, real=args.real)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .run import format_summary, run
    from .trainers import NonFiniteLossError

    resume = args.resume
    if resume == "last":
        resume = True
    try:
        summary = run(recipe, resume_from_checkpoint=resume)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def _bench(rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


def build_train_parser() -> argparse.ArgumentParser:
    train = argparse.ArgumentParser(prog="llm-entreg train", description="train a recipe (DPO with an entropy bonus, ...)")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/dpo_entropy.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. entropy_coef=0.01 max_steps=20")
    train.add_argument("--real", action="store_true", help="switch to the recipe's real model/dataset ids")
    train.add_argument("--resume", nargs="?", const="last", default=None,
                       help="resume from CKPT, or from the last checkpoint in output_dir")
    train.add_argument("--accelerate-config", default=None,
                       help="launch through `accelerate launch` with configs/NAME.yaml (or a path)")
    return train


COMMANDS = {"train": "train a recipe", "bench": "benchmark the fused log-prob + entropy ops"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: llm-entreg {train,bench} ...\n" + "".join(f"  {k:6} {v}\n" for k, v in COMMANDS.items())
        print(usage, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout, end="")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "bench":
        return _bench(argv[1:])
    return _train(build_train_parser().parse_intermixed_args(argv[1:]), argv[1:])
