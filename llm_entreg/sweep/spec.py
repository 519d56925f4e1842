"""A sweep's settings (:class:`SweepConfig`), from a recipe plus command-line axes, or from a sweep-spec YAML
(``recipes/sweep_beta.yaml``: ``base_recipe`` plus axes and options, keys in :data:`SPEC_KEYS`). Command-line
values override the spec's; command-line ``key=value`` overrides come after the spec's. See docs/sweep.md
("A sweep spec").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .grid import GridError, TrialSpec, build_trials, parse_float_list, parse_int_list, parse_log_range, parse_schedules
from .pick import Thresholds, parse_metric

SPEC_KEYS = {"base_recipe", "entropy_coef", "log_range", "schedules", "seeds", "overrides", "end_ratio", "out",
             "thresholds", "tie_tolerance", "threads", "description", "accelerate_config", "pick_metric", "workers"}
DEFAULT_TRIAL_FN = "llm_entreg.run:run"
DRY_RUN_TRIAL_FN = "llm_entreg.sweep.fake:fake_run"
ACCELERATE_TRIAL_FN = "llm_entreg.sweep.workers:accelerate_run"  # each trial under `accelerate launch`


class SweepError(ValueError):
    """The sweep's settings are invalid (bad spec, bad axis, a trial directory from other settings)."""


@dataclass
class SweepConfig:
    """Everything a sweep needs; picklable (sent to worker processes)."""

    base_recipe: str
    trials: list[TrialSpec]
    out_dir: str
    overrides: list[str] = field(default_factory=list)
    real: bool = False
    end_ratio: float = 0.01
    thresholds: Thresholds = field(default_factory=Thresholds)
    tie_tolerance: float = 0.0
    pick_metric: str = "reward"  # reward, nll or pass@K (docs/sweep.md, "The pick")
    workers: int = 1
    storage: str | None = None
    study_name: str | None = None
    devices: str = "auto"
    heartbeat: int = 60
    keep_checkpoints: bool = False
    accelerate_config: str | None = None  # run each trial under `accelerate launch` with this config (NAME or path)
    threads: int | None = None  # torch intra-op threads per trial (None: torch's default in-process; cores/workers in workers)
    trial_fn: str | Callable = DEFAULT_TRIAL_FN
    progress: bool = True
    plots: bool = True
    source: str | None = None  # the spec or recipe the sweep was started from
    recipes: dict[str, dict] | None = None  # resolved trial recipes, filled by the runner (workers skip re-validation)

    @property
    def parallel(self) -> bool:
        """Optuna-backed (shared storage) rather than the plain in-process loop."""
        return self.workers > 1 or self.storage is not None

    @property
    def trial_fn_name(self) -> str:
        fn = self.trial_fn
        if isinstance(fn, str):
            return fn
        return f"{getattr(fn, '__module__', None) or type(fn).__module__}:" \
               f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"

    def grid_hash(self) -> str:
        """Same base recipe content, overrides, axes and trial function -> same hash (the default study name)."""
        try:
            recipe_text = Path(self.base_recipe).read_text()
        except OSError:
            recipe_text = self.base_recipe
        payload = json.dumps({"recipe": recipe_text, "overrides": self.overrides, "real": self.real,
                              "trials": [t.id for t in self.trials], "end_ratio": self.end_ratio,
                              "fn": self.trial_fn_name}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:8]

    def resolved_study_name(self) -> str:
        return self.study_name or f"{Path(self.out_dir).name}-{self.grid_hash()}"

    def record(self) -> dict[str, Any]:
        """A JSON-able description written to ``sweep.json``."""
        out = {k: v for k, v in asdict(self).items() if k not in ("trials", "trial_fn", "thresholds", "recipes")}
        out["trials"] = [t.id for t in self.trials]
        out["trial_fn"] = self.trial_fn_name
        out["thresholds"] = self.thresholds.as_dict()
        out["study_name"] = self.resolved_study_name() if self.parallel else None
        return out


def _load_yaml(path: Path) -> Any:
    from ..recipes import parse_yaml  # the recipes' YAML 1.2 flavour: 1e-4 is a float, "no" stays a string

    return parse_yaml(path.read_text())


def is_sweep_spec(path: str | os.PathLike) -> bool:
    try:
        data = _load_yaml(Path(path))
    except Exception:  # noqa: BLE001 - not a readable YAML mapping: not a spec (load_recipe will say why)
        return False
    return isinstance(data, dict) and "base_recipe" in data


def load_sweep_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sweep spec; ``base_recipe`` comes back as a path that exists."""
    path = Path(path)
    data = _load_yaml(path)
    if not isinstance(data, dict) or "base_recipe" not in data:
        raise SweepError(f"{path}: a sweep spec needs a base_recipe key")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(SPEC_KEYS)}")
    if "entropy_coef" in data and "log_range" in data:
        raise SweepError(f"{path}: give entropy_coef or log_range, not both")
    base = Path(str(data["base_recipe"])).expanduser()
    candidates = [base] if base.is_absolute() else [path.parent / base, Path.cwd() / base]
    for candidate in candidates:
        if candidate.is_file():
            data["base_recipe"] = str(candidate)
            break
    else:
        raise SweepError(f"{path}: base_recipe {str(base)!r} not found (looked in {[str(c) for c in candidates]})")
    overrides = data.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    elif not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: overrides: expected a mapping or a list of 'key=value' strings")
    data["overrides"] = list(overrides)
    return data


def default_out_dir(source: str | os.PathLike) -> str:
    stem = Path(source).stem
    return os.path.join("runs", stem if stem.startswith("sweep") else f"sweep_{stem}")


#: Seeds of a sweep over the embedded default when neither the spec nor the command line gives them: three, so that
#: every configuration has an interval (docs/sweep.md, "Signal or noise").
EMBEDDED_SEEDS = 3


def default_seeds(recipe: dict) -> list[int]:
    """The recipe's seed and the next two for the embedded default (cheap runs, intervals need seeds); else the
    recipe's seed alone."""
    seed = int(recipe.get("seed", 0))
    embedded = recipe["model"].get("name_or_path") == "embedded"
    return [seed + i for i in range(EMBEDDED_SEEDS)] if embedded else [seed]


def _recipe_schedule(recipe: dict) -> str:
    trainer = recipe.get("trainer") or {}
    return trainer.get("entropy_controller") or trainer.get("entropy_schedule") or "constant"


def coef_axis(spec: dict, base_recipe: dict, entropy_coef=None, log_range=None, points: int | None = None,
              include_zero: bool = False) -> list[float]:
    """The β values: the command line's list or log range, else the spec's, else the recipe's ``entropy_coef``."""
    if entropy_coef is not None and log_range is not None:
        raise GridError("give --entropy-coef or --log-range, not both")
    if entropy_coef is not None:
        coefs = parse_float_list(entropy_coef)
    elif log_range is not None:
        coefs = parse_log_range(log_range, points, include_zero)
    elif spec.get("entropy_coef") is not None:
        coefs = parse_float_list(spec["entropy_coef"], "entropy_coef")
    elif spec.get("log_range") is not None:
        coefs = parse_log_range(spec["log_range"], points, include_zero)
    else:
        coefs = [float(base_recipe["trainer"].get("entropy_coef", 0.0) or 0.0)]
    if include_zero and 0.0 not in coefs:
        coefs = [0.0, *coefs]
    return coefs


def process_options(spec: dict, options: dict) -> tuple[int, int | None]:
    """Check ``workers``, ``threads`` and ``accelerate_config`` (flag, else spec) now, naming a bad value; the
    accelerate config also picks the trial function. Returns ``(workers, threads)``; ``options`` is updated."""
    workers = options.pop("workers", None) or spec.get("workers") or 1
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise SweepError(f"--workers: expected a positive integer, got {workers!r}")
    if workers < 1:
        raise SweepError(f"--workers: must be >= 1, got {workers}")
    accelerate_config = options.pop("accelerate_config", None) or spec.get("accelerate_config")
    if accelerate_config is not None:
        from ..launch import LaunchError, resolve_accelerate_config

        try:
            resolve_accelerate_config(str(accelerate_config))  # fail now, naming the config, not in every trial
        except LaunchError as exc:
            raise SweepError(str(exc)) from None
        if options.get("trial_fn") is None:
            options["trial_fn"] = ACCELERATE_TRIAL_FN
        options["accelerate_config"] = str(accelerate_config)
    threads = options.pop("threads", None)
    threads = threads if threads is not None else spec.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SweepError(f"--threads: expected a positive integer, got {threads!r}")
    return workers, threads


#: Trainer fields a sweep sets for each trial itself, and the flag to use instead.
SWEEP_OWNED = {
    "output_dir": "each trial writes to <sweep directory>/trials/<id>: choose the sweep directory with --out",
    "resume_from_checkpoint": "a sweep resumes its unfinished trials itself: run the same sweep command again",
    "overwrite_output_dir": "a sweep reuses finished trials; to run them again use another --out or delete it",
}


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides a sweep cannot honour, naming what to do instead."""
    for item in overrides:
        key = str(item).split("=", 1)[0].strip().removeprefix("trainer.")
        if key in SWEEP_OWNED:
            raise SweepError(f"override {item!r}: a sweep sets {key} for every trial; {SWEEP_OWNED[key]}")


def build_config(source: str, cli_overrides: list[str] | None = None, *, entropy_coef=None, log_range=None,
                 points: int | None = None, include_zero: bool = False, schedules=None, seeds=None,
                 end_ratio: float | None = None, out: str | None = None, thresholds: dict | None = None,
                 tie_tolerance: float | None = None, **options) -> SweepConfig:
    """A :class:`SweepConfig` from a recipe or a sweep spec plus command-line values (these win)."""
    from ..recipes import RecipeError, load_recipe, resolve_recipe_path

    try:  # a file, or the name of a shipped recipe or sweep spec
        source = str(resolve_recipe_path(source))
    except RecipeError:
        pass  # load_recipe names the missing file below
    spec: dict[str, Any] = load_sweep_spec(source) if is_sweep_spec(source) else {"base_recipe": source}
    base = spec["base_recipe"]
    overrides = list(spec.get("overrides") or []) + list(cli_overrides or [])
    check_overrides(overrides)
    real = bool(options.get("real", False))
    try:
        base_recipe = load_recipe(base, overrides, real=real)
    except RecipeError as exc:
        raise SweepError(str(exc)) from exc
    try:
        coefs = coef_axis(spec, base_recipe, entropy_coef, log_range, points, include_zero)
        scheds = parse_schedules(schedules if schedules is not None else spec.get("schedules", _recipe_schedule(base_recipe)),
                                 "--schedules" if schedules is not None else "schedules")
        seed_list = parse_int_list(seeds if seeds is not None else spec.get("seeds", default_seeds(base_recipe)),
                                   "--seeds" if seeds is not None else "seeds")
        merged_thresholds = {**(spec.get("thresholds") or {}), **{k: v for k, v in (thresholds or {}).items() if v is not None}}
        thr = Thresholds(**merged_thresholds)
    except (GridError, TypeError, ValueError) as exc:
        raise SweepError(str(exc)) from exc
    end = end_ratio if end_ratio is not None else float(spec.get("end_ratio", 0.01))
    if not end > 0:
        raise SweepError(f"--end-ratio: must be > 0 (the exponential schedule cannot reach 0), got {end}")
    tol = tie_tolerance if tie_tolerance is not None else float(spec.get("tie_tolerance", 0.0))
    if tol < 0:
        raise SweepError(f"--tie-tolerance: must be >= 0, got {tol}")
    metric = options.pop("pick_metric", None) or spec.get("pick_metric") or "reward"
    try:
        parse_metric(str(metric))
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    workers, threads = process_options(spec, options)
    return SweepConfig(
        base_recipe=str(base), trials=build_trials(coefs, scheds, seed_list),
        out_dir=str(out or spec.get("out") or default_out_dir(source)), overrides=overrides, real=real,
        end_ratio=end, thresholds=thr, tie_tolerance=tol, pick_metric=str(metric), workers=workers, threads=threads,
        source=str(source),
        **{k: v for k, v in options.items() if k != "real" and v is not None},
    )
