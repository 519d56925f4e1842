"""β sweeps: a grid over the entropy coefficient (x schedule x seed) run sequentially or through Optuna workers,
with per-trial flags (collapsed / never committed), the best-β pick, a results table and plots.

    from llm_entreg.sweep import build_config, run_sweep
    result = run_sweep(build_config("recipes/sweep_beta.yaml"))
    result.best  # the pick; also in <out>/best.json

Modules: :mod:`.grid` (axes, product, trial ids; pure), :mod:`.spec` (sweep-spec YAML and settings),
:mod:`.runner` (one trial, the sequential loop), :mod:`.workers` (Optuna study and worker
processes, the ``accelerate launch`` trial), :mod:`.report` (rows, tables, plots), :mod:`.store` (trial.json,
results.csv/md), :mod:`.pick` (flags and the pick rule; pure), :mod:`.fake` (a synthetic trial function for dry
runs and tests). :func:`run_sweep`, here, puts them together. See docs/sweep.md.
"""

from collections.abc import Callable
from pathlib import Path

from .grid import Grid, GridError, TrialSpec, build_trials, format_coef, log_range, parse_float_list, trial_id
from .pick import (RULE, Thresholds, is_collapsed, is_never_committed, pick_best, score_configs, seed_centred_correlation,
                   trial_metrics)
from .report import SweepResult, collect, write_report
from .runner import check_trial_dirs, last_checkpoint, run_sequential, run_trial, trial_dir
from .spec import SweepConfig, SweepError, build_config, load_sweep_spec
from .store import write_json
from .workers import open_study, run_parallel

__all__ = [
    "RULE", "Grid", "GridError", "SweepConfig", "SweepError", "SweepResult", "Thresholds", "TrialSpec",
    "build_config", "build_trials", "format_coef", "is_collapsed", "is_never_committed",
    "last_checkpoint", "load_sweep_spec", "log_range", "open_study", "parse_float_list", "pick_best", "run_sweep",
    "score_configs", "seed_centred_correlation",
    "run_trial", "trial_dir", "trial_id", "trial_metrics",
]


def run_sweep(config: SweepConfig, trial_fn: Callable | None = None, report_only: bool = False) -> SweepResult:
    """Run (or resume) every trial, then write results.csv / results.md / best.json and the plots."""
    if trial_fn is not None:
        config.trial_fn = trial_fn
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_trial_dirs(config)
    write_json(out / "sweep.json", config.record())
    study = None
    try:
        if config.parallel:
            if not report_only:
                run_parallel(config)
            study = open_study(config, create=True)
        elif not report_only:
            run_sequential(config)
    finally:  # also after Ctrl-C: the report shows what finished
        rows, curves = collect(config, study)
        result = write_report(config, rows, curves)
    return result
