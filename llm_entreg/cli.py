"""``llm-entreg``: parse, build, launch. No math here.

    llm-entreg train RECIPE.yaml [key=value ...] [--real] [--resume [CKPT]] [--accelerate-config NAME]
    llm-entreg bench [--quick] [bench options]
    llm-entreg sweep RECIPE_OR_SWEEP.yaml [key=value ...] [--entropy-coef LIST | --log-range A:B --points N]
                     [--schedules LIST] [--seeds LIST] [--out DIR] [--workers N] [--storage URL] [--study-name NAME]
    accelerate launch --config_file configs/cpu_ddp_2proc.yaml -m llm_entreg train RECIPE.yaml

RECIPE is a YAML file or the name of a shipped recipe (``dpo_entropy``); NAME a config file or a shipped config.
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(args, raw: list[str]) -> int:
    if args.accelerate_config:
        from .launch import LaunchError, relaunch, resolve_accelerate_config

        try:
            config = resolve_accelerate_config(args.accelerate_config)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        forwarded, skip = [], False
        for item in raw:  # drop "--accelerate-config NAME" / "--accelerate-config=NAME"; forward the rest
            if skip:
                skip = False
            elif item == "--accelerate-config":
                skip = True
            elif not item.startswith("--accelerate-config="):
                forwarded.append(item)
        return relaunch(config, ["train", *forwarded], log=lambda line: print(line, flush=True))

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
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/dpo_entropy.yaml, or a shipped recipe's name")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. entropy_coef=0.01 max_steps=20")
    train.add_argument("--real", action="store_true", help="switch to the recipe's real model/dataset ids")
    train.add_argument("--resume", nargs="?", const="last", default=None,
                       help="resume from CKPT, or from the last checkpoint in output_dir")
    train.add_argument("--accelerate-config", default=None,
                       help="launch through `accelerate launch` with a shipped config NAME (or a path)")
    return train


def build_sweep_parser() -> argparse.ArgumentParser:
    sweep = argparse.ArgumentParser(
        prog="llm-entreg sweep",
        description="sweep the entropy coefficient β (x schedule x seed) over a recipe; pick β on validation "
        "reward, ties broken by validation NLL. See docs/sweep.md.",
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
    axes.add_argument("--seeds", default=None, metavar="LIST", help="seeds, e.g. 0,1 (default: the recipe's seed)")
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
                      help="rewards within this of the best tie; ties go to the lowest NLL (default 0)")
    return sweep


def _sweep(argv: list[str]) -> int:
    args = build_sweep_parser().parse_intermixed_args(argv)
    from .sweep.spec import DRY_RUN_TRIAL_FN, SweepError, build_config

    options = dict(workers=args.workers, storage=args.storage, study_name=args.study_name, devices=args.devices,
                   heartbeat=args.heartbeat, threads=args.threads, accelerate_config=args.accelerate_config, keep_checkpoints=args.keep_checkpoints or None,
                   trial_fn=args.trial_fn or (DRY_RUN_TRIAL_FN if args.dry_run else None),
                   progress=False if args.no_progress else None, plots=False if args.no_plots else None,
                   real=args.real)
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
        nll = f", NLL {best['val_nll']:.4g}" if best.get("val_nll") is not None else ""
        print(f"pick: β = {format_coef(best['entropy_coef'])} ({best['schedule']}): validation reward "
              f"{best['val_reward']:.4g}{nll} — {best['reason']} (best.json)")
    else:
        print("pick: none (no trial finished with a validation reward)")
    return 0 if result.n_failed == 0 and result.n_complete == len(result.rows) else 1


COMMANDS = {"train": "train a recipe", "bench": "benchmark the fused log-prob + entropy ops",
            "sweep": "sweep the entropy coefficient β and pick it on validation reward / NLL"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: llm-entreg {train,bench,sweep} ...\n" + "".join(f"  {k:6} {v}\n" for k, v in COMMANDS.items())
        print(usage, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout, end="")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "bench":
        return _bench(argv[1:])
    if argv[0] == "sweep":
        return _sweep(argv[1:])
    return _train(build_train_parser().parse_intermixed_args(argv[1:]), argv[1:])
