"""β sweeps: a grid over the entropy coefficient (x schedule x seed) run sequentially or through Optuna workers,
with per-trial flags (collapsed / never committed), the best-β pick, a results table and plots.

    from llm_entreg.sweep import build_config, run_sweep
    result = run_sweep(build_config("recipes/sweep_beta.yaml"))
    result.best  # the pick; also in <out>/best.json

Modules: :mod:`.grid` (axes, product, trial ids; pure), :mod:`.spec` (sweep-spec YAML and settings),
:mod:`.runner` (sequential and Optuna runners, resume, failure capture), :mod:`.store` (trial.json,
results.csv/md), :mod:`.pick` (flags and the pick rule; pure), :mod:`.plots`, :mod:`.fake` (a synthetic trial
function for dry runs and tests). See docs/sweep.md.
"""

from .grid import Grid, GridError, TrialSpec, build_trials, format_coef, log_range, parse_float_list, trial_id
from .pick import RULE, Thresholds, fit_exp_entropy, is_collapsed, is_never_committed, pick_best, trial_metrics
from .spec import SweepConfig, SweepError, build_config, load_sweep_spec
from .runner import SweepResult, run_sweep, run_trial

__all__ = [
    "Grid", "GridError", "RULE", "SweepConfig", "SweepError", "SweepResult", "Thresholds", "TrialSpec",
    "build_config", "build_trials", "fit_exp_entropy", "format_coef", "is_collapsed", "is_never_committed",
    "load_sweep_spec", "log_range", "parse_float_list", "pick_best", "run_sweep", "run_trial", "trial_id",
    "trial_metrics",
]
