"""``llm-entreg``: parse, build, launch. No math here.

    llm-entreg train RECIPE [key=value ...] [--field value ...] [--real] [--resume | --resume=CKPT]
                     [--accelerate-config NAME]
    llm-entreg train --config RECIPE.yaml --learning_rate 1e-5          (TRL's habits)
    llm-entreg fields ALGORITHM [FILTER]                                  (every recipe key and trainer field)
    llm-entreg bench [--quick] [bench options]
    llm-entreg sweep RECIPE_OR_SWEEP.yaml [key=value ...] [--entropy-coef LIST | --log-range A:B --points N] ...
    accelerate launch --config_file configs/cpu_ddp_2proc.yaml -m llm_entreg train RECIPE.yaml

RECIPE is a YAML file or the name of a shipped recipe (``dpo_entropy``); NAME a config file or a shipped config.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import NoReturn

from .launch import PREEMPTED_EXIT

#: ``llm-entreg train``'s own options; every other ``--name [value]`` is a recipe key (TRL's CLI habit).
_TRAIN_OPTIONS_WITH_VALUE = ("--accelerate-config", "--config")
_TRAIN_FLAGS = ("--real", "-h", "--help")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_train_argv(argv: list[str]) -> tuple[list[str], list[str], object]:
    """Split ``train``'s arguments into (argparse's, recipe overrides, resume). ``--key value``, ``--key=value`` and
    a bare ``--flag`` (true) become ``key=value`` overrides, in order with the positional ones; ``--resume`` is a
    flag (the newest complete checkpoint) and takes a path only as ``--resume=PATH``."""
    own, overrides, resume = [], [], None
    i = 0
    while i < len(argv):
        item = argv[i]
        name = item.split("=", 1)[0]
        if item == "--resume":
            resume = True
        elif item.startswith("--resume="):
            resume = item.split("=", 1)[1]
        elif name in _TRAIN_OPTIONS_WITH_VALUE:
            own.append(item)
            if "=" not in item and i + 1 < len(argv):
                own.append(argv[i + 1])
                i += 1
        elif item in _TRAIN_FLAGS:
            own.append(item)
        elif item.startswith("--") and len(item) > 2:
            key = name[2:].replace("-", "_")
            if "=" in item:
                value = item.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _OVERRIDE.match(argv[i + 1]):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
            overrides.append(f"{key}={value}")
        elif _OVERRIDE.match(item) and not os.path.exists(item):  # key=value (a file named a=b stays a recipe)
            overrides.append(item)
        else:
            own.append(item)
        i += 1
    return own, overrides, resume


def _train(argv: list[str]) -> int:
    own, overrides, resume = split_train_argv(argv)
    parser = build_train_parser()
    args = parser.parse_args(own)
    recipe_name = args.config or args.recipe
    if args.config and args.recipe:
        print(f"error: give the recipe once: --config {args.config} or {args.recipe}", file=sys.stderr)
        return 2
    if not recipe_name:
        parser.print_usage(sys.stderr)
        print("error: a recipe is required (a YAML file or a shipped name; see `llm-entreg train --help`)",
              file=sys.stderr)
        return 2
    from .launch import LaunchError, check_single_process_launch

    try:
        check_single_process_launch()
        if args.accelerate_config:
            return _relaunch(args.accelerate_config, argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .recipes import RecipeError, load_recipe

    try:
        recipe = load_recipe(recipe_name, overrides, real=args.real)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .checkpoints import CheckpointError
    from .run import Preempted, RunError, format_summary, run
    from .trainers import NonFiniteLossError

    try:
        summary = run(recipe, resume_from_checkpoint=resume)
    except Preempted as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(exc), file=sys.stderr)
        return PREEMPTED_EXIT
    except (RunError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits (every collective of the run is behind this rank
    already). The run's objects (trainer, DDP wrapper) are collected first, so the group and its communication
    threads go while the interpreter is still whole."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A rank of a multi-process run (``WORLD_SIZE`` > 1) flushes its logs and
    streams and ends without interpreter finalization: a communication thread torn down during finalization can
    abort a rank after a finished run (seen, rarely, with gloo DDP and DeepSpeed on CPUs). Its files are closed and
    its process group destroyed by then. Any other process exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> NoReturn:
    """The ``llm-entreg`` command and ``python -m llm_entreg``: :func:`main`, then :func:`exit_process`."""
    exit_process(main())


def _relaunch(name: str, argv: list[str]) -> int:
    from .launch import relaunch, resolve_accelerate_config

    config = resolve_accelerate_config(name)
    forwarded, skip = [], False
    for item in argv:  # drop "--accelerate-config NAME" / "--accelerate-config=NAME"; forward the rest
        if skip:
            skip = False
        elif item == "--accelerate-config":
            skip = True
        elif not item.startswith("--accelerate-config="):
            forwarded.append(item)
    return relaunch(config, ["train", *forwarded], log=lambda line: print(line, flush=True))


def _bench(rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


def _train_epilog() -> str:
    from .launch import CONFIG_ALIASES, shipped_configs
    from .recipes import SECTIONS, algorithm_names, packaged_recipes

    sections = ", ".join(SECTIONS)
    return (
        f"recipe sections: {sections}\n"
        "  key=value and --key value set a trainer field (entropy_coef=0.01, --learning_rate 1e-5) or a section key\n"
        "  (evaluation.num_prompts=100). Every key, its type, default and help:\n"
        f"    llm-entreg fields ALGORITHM    (ALGORITHM: {', '.join(algorithm_names())})\n"
        f"shipped recipes: {', '.join(sorted(packaged_recipes()))}\n"
        f"accelerate configs: {', '.join(sorted(shipped_configs()))}; TRL's names {', '.join(CONFIG_ALIASES)}\n"
        "resume: --resume continues from the newest complete checkpoint in output_dir (an incomplete one is skipped,\n"
        "  and said so); --resume=PATH or trainer.resume_from_checkpoint=PATH from that one. A second run into a used\n"
        "  output_dir stops unless it resumes or sets overwrite_output_dir=true. SIGTERM saves a checkpoint at the\n"
        f"  next step and exits with status {PREEMPTED_EXIT}. See docs/recipes.md."
    )


class _TrainParser(argparse.ArgumentParser):
    """Builds its epilog (which imports the trainers to list the algorithms) only when the help is printed."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = _train_epilog()
        return super().format_help()


def build_train_parser() -> argparse.ArgumentParser:
    train = _TrainParser(
        prog="llm-entreg train", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="llm-entreg train RECIPE [key=value ...] [--key value ...] [--real] [--resume | --resume=CKPT] "
              "[--accelerate-config NAME]",
        description="train a recipe (DPO with an entropy bonus, GRPO, PPO, ...)")
    train.add_argument("recipe", nargs="?", default=None,
                       help="YAML recipe, e.g. recipes/dpo_entropy.yaml, or a shipped recipe's name")
    train.add_argument("--config", default=None, metavar="RECIPE", help="the recipe, TRL style (instead of RECIPE)")
    train.add_argument("--real", action="store_true", help="switch to the recipe's real model/dataset ids")
    train.add_argument("--resume", action="store_true",
                       help="resume from the newest complete checkpoint in output_dir; --resume=CKPT from CKPT")
    train.add_argument("--accelerate-config", default=None, metavar="NAME",
                       help="launch through `accelerate launch` with a shipped config NAME (or a path)")
    return train


def _fields(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-entreg fields",
                                     description="every recipe key and trainer field: type, default, help")
    parser.add_argument("algorithm", help="dpo, grpo, ppo, ...")
    parser.add_argument("filter", nargs="?", default=None, help="only names containing this, e.g. entropy")
    args = parser.parse_args(argv)
    from .fields import field_table
    from .recipes import SECTIONS, RecipeError, config_class

    try:
        rows = field_table(config_class(args.algorithm))
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for section, keys in SECTIONS.items():
        if isinstance(keys, dict):
            for key, default in keys.items():
                if not args.filter or args.filter in f"{section}.{key}":
                    print(f"{section}.{key} = {default!r}")
    for row in rows:
        if args.filter and args.filter not in row["name"]:
            continue
        choices = f" {tuple(row['choices'])}" if row["choices"] else ""
        print(f"trainer.{row['name']}: {row['type']}{choices} = {row['default']!r}")
        if row["help"]:
            print(f"    {row['help']}")
    return 0


def build_sweep_parser() -> argparse.ArgumentParser:
    sweep = argparse.ArgumentParser(
        prog="llm-entreg sweep",
        description="sweep the entropy coefficient β (x schedule x seed) over a recipe; every configuration gets a "
        "95% interval over seeds and held-out prompts, and the pick must beat β = 0 beyond it. See docs/sweep.md.",
    )
    sweep.add_argument("recipe", help="a recipe (recipes/dpo_entropy.yaml) or a sweep spec (recipes/sweep_beta.yaml)")
    sweep.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial, e.g. max_steps=60")
    axes = sweep.add_argument_group("axes (the grid is their product)")
    axes.add_argument("--entropy-coef", default=None, metavar="LIST", help="β values, e.g. 0,1e-4,1e-3,1e-2,1e-1")
    axes.add_argument("--log-range", default=None, metavar="START:STOP",
                      help="log-spaced β values from START to STOP inclusive, e.g. 1e-4:1e-1 (with --points)")
    axes.add_argument("--points", type=int, default=None, help="number of --log-range values (default 4)")
    axes.add_argument("--include-zero", action="store_true", help="add β = 0 (the unregularized baseline)")
    axes.add_argument("--schedules", default=None, metavar="LIST",
                      help="constant (no schedule), linear, exponential, cosine, target_entropy, learned_alpha "
                      "(default: the recipe's own)")
    axes.add_argument("--end-ratio", type=float, default=None,
                      help="decaying schedules go from β to β x END_RATIO (default 0.01)")
    axes.add_argument("--seeds", default=None, metavar="LIST",
                      help="seeds, e.g. 0,1,2 (default: the spec's; for the embedded default the recipe's seed and the "
                      "next two; else the recipe's seed)")
    where = sweep.add_argument_group("where and how")
    where.add_argument("--out", default=None, help="sweep directory (default runs/sweep_<recipe stem>)")
    where.add_argument("--real", action="store_true", help="switch the base recipe to its real model/dataset ids")
    where.add_argument("--workers", type=int, default=None,
                       help="worker processes (default 1: trials run one after another in this process)")
    where.add_argument("--storage", default=None,
                       help="Optuna storage URL shared by workers (sqlite:///path.db, or an RDB URL across "
                       "machines); default with --workers > 1: sqlite in the sweep directory")
    where.add_argument("--study-name", default=None, help="Optuna study name (same on every machine)")
    where.add_argument("--devices", default=None, help="auto (one GPU per worker if any), cpu, or a list 0,1,...")
    where.add_argument("--accelerate-config", default=None,
                       help="run each trial under `accelerate launch` with configs/NAME.yaml (or a path), e.g. "
                       "cpu_ddp_2proc: a trial on 2 processes")
    where.add_argument("--threads", type=int, default=None,
                       help="torch threads per trial (default: torch's own in-process; cores / workers for CPU "
                       "workers); 1 is fastest for tiny models on a busy CPU")
    where.add_argument("--heartbeat", type=int, default=None,
                       help="worker heartbeat in seconds; a trial silent for 3x this is re-queued (default 60)")
    where.add_argument("--keep-checkpoints", action="store_true",
                       help="keep each finished trial's checkpoint-* directories (default: deleted)")
    where.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from what exists")
    where.add_argument("--dry-run", action="store_true",
                       help="synthetic trials (no model): check the grid, workers and storage in seconds")
    where.add_argument("--trial-fn", default=None, help=argparse.SUPPRESS)
    where.add_argument("--no-progress", action="store_true", help="no progress bar / per-trial lines")
    where.add_argument("--no-plots", action="store_true", help="write the tables and best.json but no PNGs")
    pick = sweep.add_argument_group("flags and the pick")
    pick.add_argument("--collapse-fraction", type=float, default=None,
                      help="collapsed: last-window mean entropy < this x first-window mean (default 0.5)")
    pick.add_argument("--window", type=float, default=None,
                      help="fraction of logged steps in the first/last window (default 0.2)")
    pick.add_argument("--commit-band", type=float, default=None,
                      help="never committed: entropy within ± this fraction of its start ... (default 0.1)")
    pick.add_argument("--commit-min-gain", type=float, default=None,
                      help="... and validation reward gained less than this (default 0.01)")
    pick.add_argument("--tie-tolerance", type=float, default=None,
                      help="configurations within this of the best tie; ties go to the lowest NLL (default 0)")
    pick.add_argument("--pick-metric", default=None, metavar="METRIC",
                      help="what the pick maximises: reward (validation reward, default), pass@K (e.g. pass@16) or "
                      "nll (minimised); the pick must beat β = 0 beyond its 95%% interval")
    return sweep


def _sweep(argv: list[str]) -> int:
    args = build_sweep_parser().parse_intermixed_args(argv)
    from .sweep.spec import DRY_RUN_TRIAL_FN, SweepError, build_config

    options = dict(workers=args.workers, storage=args.storage, study_name=args.study_name, devices=args.devices,
                   heartbeat=args.heartbeat, threads=args.threads, accelerate_config=args.accelerate_config, keep_checkpoints=args.keep_checkpoints or None,
                   trial_fn=args.trial_fn or (DRY_RUN_TRIAL_FN if args.dry_run else None),
                   progress=False if args.no_progress else None, plots=False if args.no_plots else None,
                   real=args.real, pick_metric=args.pick_metric)
    out = args.out
    if args.dry_run and out is None:
        from .sweep.spec import default_out_dir

        out = default_out_dir(args.recipe) + "_dry_run"
    try:
        config = build_config(
            args.recipe, args.overrides, entropy_coef=args.entropy_coef, log_range=args.log_range, points=args.points,
            include_zero=args.include_zero, schedules=args.schedules, seeds=args.seeds, end_ratio=args.end_ratio,
            out=out, tie_tolerance=args.tie_tolerance,
            thresholds=dict(collapse_fraction=args.collapse_fraction, window=args.window,
                            commit_band=args.commit_band, commit_min_gain=args.commit_min_gain),
            **options,
        )
        from .sweep import run_sweep

        mode = (f"{config.workers} worker process(es), study {config.resolved_study_name()!r}"
                if config.parallel else "sequential")
        print(f"sweep: {len(config.trials)} trial(s) of {config.base_recipe} -> {config.out_dir} ({mode})", flush=True)
        result = run_sweep(config, report_only=args.report_only)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .sweep.grid import format_coef

    print(f"{result.n_complete}/{len(result.rows)} trial(s) complete, {result.n_failed} failed -> {config.out_dir}")
    if result.best:
        best = result.best
        lo, hi = best["ci95"]
        verdict = ("beyond noise" if best["significant"] else "NOT beyond noise: no β beat β = 0 beyond its interval"
                   if best.get("baseline") else "no β = 0 run to compare with")
        print(f"pick ({best['metric']}): β = {format_coef(best['entropy_coef'])} ({best['schedule']}): "
              f"{best['mean']:.4g} [95% {lo:.4g}, {hi:.4g}] over seeds {best['seeds']} — {verdict}; "
              f"{best['reason']} (best.json)")
    else:
        print("pick: none (no trial finished with the pick metric)")
    return 0 if result.n_failed == 0 and result.n_complete == len(result.rows) else 1


COMMANDS = {"train": "train a recipe", "fields": "list every recipe key and trainer field of an algorithm",
            "bench": "benchmark the fused log-prob + entropy ops",
            "sweep": "sweep the entropy coefficient β and pick it on validation reward / NLL"}


def _version() -> str:
    from . import __version__
    from .utils import package_version

    deps = ", ".join(f"{name} {package_version(name)}" for name in ("trl", "transformers", "accelerate", "torch"))
    return f"llm-entreg {__version__} ({deps})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: llm-entreg [--version] {train,fields,bench,sweep} ...\n" + "".join(
        f"  {k:6} {v}\n" for k, v in COMMANDS.items())
    if argv and argv[0] == "--version":
        print(_version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        match = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        print(f"llm-entreg: unknown command {argv[0]!r}{hint}\n{usage}", end="", file=sys.stderr)
        return 2
    command = {"train": _train, "fields": _fields, "bench": _bench, "sweep": _sweep}[argv[0]]
    return command(argv[1:])
