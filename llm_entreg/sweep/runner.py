"""Run a sweep's trials: one after another in this process, or in worker processes that claim grid points
through an Optuna study in shared storage (SQLite on one machine, any RDB URL across machines).

Every trial goes through :func:`run_trial`, which

- skips a finished trial (its ``trial.json`` says ``complete`` with the same settings fingerprint) and reuses its row;
- resumes an interrupted one from the last ``checkpoint-*`` in its directory (the rule of
  ``transformers.trainer_utils.get_last_checkpoint``);
- records a failure (``Type: message`` in the row, the traceback in ``traceback.txt``) instead of raising.

The trial function is injectable: anything with :func:`llm_entreg.run.run`'s signature
``fn(recipe, resume_from_checkpoint=None, log=print) -> summary``, given as a callable or as ``"module:function"``
(worker processes need the string form or an importable function).

Parallel mode (``workers > 1`` or a ``storage`` URL): the grid is an Optuna ``GridSampler`` over one categorical
parameter, ``trial_id``. Each worker process loads the study and runs ``study.optimize``; Optuna's storage hands
out grid points, so any number of processes on any number of machines can share one sweep. A grid point that
another process is running or has finished is pruned as a duplicate, never run twice at once. Workers heartbeat
through the storage; a trial whose worker died is failed after the grace period and re-queued (Optuna's
``RetryFailedTrialCallback``). Each finished trial stores its results row and compact curves in the study's user
attributes, so any machine can write the full report (``--report-only``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..utils import torch_threads
from .grid import TrialSpec, format_coef, trial_overrides
from .pick import COEF_KEYS, ENTROPY_KEYS, REWARD_KEYS, pick_best, trial_metrics
from .spec import SweepConfig, SweepError
from .store import (METRICS_FILE, TRACEBACK_FILE, is_finished, read_metrics, read_trial, write_json, write_results_csv,
                    write_results_md, write_trial)

TRIALS_DIR = "trials"
CURVE_KEYS = ("loss", *ENTROPY_KEYS, *COEF_KEYS, *REWARD_KEYS)


class TrialFailed(RuntimeError):
    """Raised inside an Optuna objective after a failure was recorded, so Optuna marks the trial FAIL."""


# ----------------------------------------------------------------------------------------------------------- trials
def resolve_trial_fn(fn: str | Callable) -> Callable:
    if callable(fn):
        return fn
    module, sep, name = str(fn).partition(":")
    if not sep:
        raise SweepError(f"--trial-fn: expected MODULE:FUNCTION, got {fn!r}")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SweepError(f"--trial-fn: cannot import {fn!r} ({exc})") from exc
    return obj


def trial_dir(config: SweepConfig, trial: TrialSpec) -> Path:
    return Path(config.out_dir) / TRIALS_DIR / trial.id


def trial_recipe(config: SweepConfig, trial: TrialSpec) -> dict:
    """The base recipe with the sweep's overrides, then the trial's axis values, writing into its own directory."""
    import copy

    if config.recipes and trial.id in config.recipes:
        return copy.deepcopy(config.recipes[trial.id])
    from ..recipes import RecipeError, load_recipe, trainer_fields

    try:
        recipe = load_recipe(config.base_recipe, [*config.overrides, *trial_overrides(trial, config.end_ratio)],
                             real=config.real)
    except RecipeError as exc:
        raise SweepError(f"trial {trial.id}: {exc}") from exc
    recipe["trainer"]["output_dir"] = str(trial_dir(config, trial))
    if config.accelerate_config:
        recipe["launcher"] = {"accelerate_config": config.accelerate_config}
    if "disable_tqdm" in trainer_fields(recipe["algorithm"]):
        recipe["trainer"].setdefault("disable_tqdm", True)  # the sweep has its own progress bar
    return recipe


def fingerprint(recipe: dict, trial_fn_name: str) -> str:
    """Hash of what decides a trial's result: the resolved recipe (not its paths) and the trial function."""
    payload = {k: v for k, v in recipe.items() if k not in ("source",)}
    payload["trainer"] = {k: v for k, v in recipe["trainer"].items() if k not in ("output_dir", "disable_tqdm")}
    text = json.dumps({"recipe": payload, "fn": trial_fn_name}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_trial_dirs(config: SweepConfig) -> dict[str, str]:
    """Resolve and fingerprint every trial (an invalid recipe fails here, before anything runs); refuse a trial
    directory left by a sweep with other settings. The resolved recipes are kept in ``config.recipes``."""
    prints, recipes = {}, {}
    for trial in config.trials:
        recipes[trial.id] = trial_recipe(config, trial)
        fp = fingerprint(recipes[trial.id], config.trial_fn_name)
        record = read_trial(trial_dir(config, trial))
        if record is not None and record.get("fingerprint") not in (None, fp):
            raise SweepError(
                f"{trial_dir(config, trial)} holds a trial run with other settings (recipe, overrides or trial "
                f"function changed); use another --out, or delete that directory to rerun it"
            )
        prints[trial.id] = fp
    config.recipes = recipes
    return prints


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` directory in ``directory`` (highest step), or ``None``.

    The same rule as ``transformers.trainer_utils.get_last_checkpoint`` (which the trainer uses for
    ``resume_from_checkpoint=True``), without importing transformers in processes that do not train.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p.name) for p in directory.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return str(directory / max(steps)[1]) if steps else None


@contextlib.contextmanager
def _output_to(path: Path, enabled: bool = True):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and logging too) to ``path``."""
    if not enabled:
        yield
        return
    try:
        saved = os.dup(1), os.dup(2)
    except OSError:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _base_row(config: SweepConfig, trial: TrialSpec) -> dict[str, Any]:
    return {"id": trial.id, **trial.params(), "output_dir": f"{TRIALS_DIR}/{trial.id}"}


def run_trial(config: SweepConfig, trial: TrialSpec, trial_fn: Callable | None = None,
              capture_output: bool = True) -> tuple[dict[str, Any], bool]:
    """Run (or reuse, or resume) one trial. Returns ``(row, reused)``; never raises for a failing trial."""
    fn = resolve_trial_fn(trial_fn or config.trial_fn)
    directory = trial_dir(config, trial)
    recipe = trial_recipe(config, trial)
    fp = fingerprint(recipe, config.trial_fn_name)
    record = read_trial(directory)
    if is_finished(record, fp):
        return record["row"], True
    checkpoint = last_checkpoint(directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {"id": trial.id, "params": trial.params(), "overrides": [*config.overrides, *trial_overrides(trial, config.end_ratio)],
              "fingerprint": fp, "trial_fn": config.trial_fn_name, "status": "running", "resumed_from": checkpoint,
              "host": socket.gethostname(), "pid": os.getpid(), "started": started}
    write_trial(directory, record)
    (directory / TRACEBACK_FILE).unlink(missing_ok=True)
    row = _base_row(config, trial)
    try:
        with _output_to(directory / "trial.log", capture_output), torch_threads(config.threads):
            summary = fn(recipe, resume_from_checkpoint=checkpoint, log=print)
        if not isinstance(summary, dict):
            try:
                summary = json.loads((directory / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
        history = read_metrics(directory / METRICS_FILE)
        row.update(status="complete", **trial_metrics(summary, history, config.thresholds), error=None)
        if not config.keep_checkpoints:
            for ckpt in directory.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - a failed trial is a result, not the end of the sweep
        message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        row.update(status="failed", error=f"{type(exc).__name__}: {message}".rstrip(": "))
        (directory / TRACEBACK_FILE).write_text(traceback.format_exc())
    finally:
        if time.time() - started > 5:  # free a real trial's model before the next; ~1 s, so not after instant ones
            gc.collect()
    row["seconds"] = round(time.time() - started, 1)
    row["resumed_from"] = Path(checkpoint).name if checkpoint else None
    record.update(status=row["status"], finished=time.time(), seconds=row["seconds"], row=row, error=row.get("error"))
    write_trial(directory, record)
    return row, False


def status_line(row: dict, reused: bool = False, done: int | None = None, total: int | None = None) -> str:
    head = f"[{done}/{total}] " if done is not None else ""
    if row.get("status") != "complete":
        return f"{head}{row['id']}: {row.get('status', '?').upper()} {row.get('error') or ''}".rstrip()
    parts = [f"{head}{row['id']}:"]
    if row.get("val_reward") is not None:
        parts.append(f"reward {row['val_reward']:.4g}")
    if row.get("val_nll") is not None:
        parts.append(f"nll {row['val_nll']:.4g}")
    if row.get("entropy_first") is not None and row.get("entropy_last") is not None:
        parts.append(f"H {row['entropy_first']:.3g}->{row['entropy_last']:.3g}")
    flags = [name for name in ("collapsed", "never_committed") if row.get(name)]
    if flags:
        parts.append("[" + ",".join(flags) + "]")
    parts.append("(reused)" if reused else f"({row.get('seconds', 0):.0f} s" + (f", resumed from {row['resumed_from']})"
                                                                               if row.get("resumed_from") else ")"))
    return " ".join(parts)


class Progress:
    """A tqdm bar over trials plus one printed line per finished trial."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = tqdm(total=total, desc="sweep", unit="trial", disable=not enabled, file=sys.stderr, leave=True)

    def finished(self, row: dict, reused: bool = False) -> None:
        self.done += 1
        self.bar.update(1)
        line = status_line(row, reused, self.done, self.total)
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------------- sequential
def run_sequential(config: SweepConfig, trial_fn: Callable | None = None) -> None:
    progress = Progress(len(config.trials), config.progress)
    try:
        for trial in config.trials:
            row, reused = run_trial(config, trial, trial_fn)
            progress.finished(row, reused)
    finally:
        progress.close()


# ----------------------------------------------------------------------------------------------------------- optuna
def _default_storage(config: SweepConfig) -> str:
    return f"sqlite:///{(Path(config.out_dir) / 'optuna.db').resolve()}"


def make_storage(url: str, heartbeat: int = 60):
    """An Optuna RDB storage with heartbeats, re-queueing trials whose worker died (SQLite: a lock timeout)."""
    import warnings

    import optuna
    from optuna import storages

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they have been there since 2.x
        warnings.simplefilter("ignore")
        if heartbeat and heartbeat > 0:
            if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            else:
                kwargs["failed_trial_callback"] = storages.RetryFailedTrialCallback(max_retry=3)
            kwargs.update(heartbeat_interval=int(heartbeat), grace_period=int(heartbeat) * 3)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return storages.RDBStorage(url, **kwargs)


def _grid_sampler(config: SweepConfig):
    from optuna.samplers import GridSampler

    class SweepGridSampler(GridSampler):
        """GridSampler that leaves stopping to the workers (they stop when no grid point is left unclaimed), so
        re-queued trials are not dropped when the grid looks exhausted."""

        def after_trial(self, study, trial, state, values):  # noqa: D401
            return None

    return SweepGridSampler({"trial_id": [t.id for t in config.trials]}, seed=0)


def open_study(config: SweepConfig, create: bool = True):
    import optuna

    storage = make_storage(config.storage or _default_storage(config), config.heartbeat)
    name = config.resolved_study_name()
    if create:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                   sampler=_grid_sampler(config), load_if_exists=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=_grid_sampler(config))


def _trial_id_of(t, sampler=None) -> str | None:
    """The grid point of an Optuna trial: its parameter, its queued parameter, or (between the sampler's choice
    and the objective's first line) the grid point the sampler assigned it."""
    if "trial_id" in t.params:
        return t.params["trial_id"]
    fixed = t.system_attrs.get("fixed_params") or {}
    if "trial_id" in fixed:
        return fixed["trial_id"]
    grid = getattr(sampler, "_all_grids", None)  # GridSampler's shuffled grid (same seed in every process)
    gid = t.system_attrs.get("grid_id")
    if grid is not None and isinstance(gid, int) and 0 <= gid < len(grid):
        return grid[gid][0]
    return None


def _study_state(study, ids) -> dict[str, Any]:
    """Per grid id: done (a complete row), running, waiting, attempted; plus rows from the storage."""
    from optuna.trial import TrialState

    state = {"done": set(), "running": set(), "waiting": set(), "attempted": set(), "rows": {}, "finished_at": {}}
    for t in study.get_trials(deepcopy=False):
        tid = _trial_id_of(t)
        if tid not in ids:
            continue
        row = t.user_attrs.get("row")
        if t.state == TrialState.WAITING:
            state["waiting"].add(tid)
            continue
        state["attempted"].add(tid)
        if t.state == TrialState.RUNNING:
            state["running"].add(tid)
        if isinstance(row, dict) and t.datetime_complete is not None:
            state["finished_at"][tid] = max(state["finished_at"].get(tid, 0.0), t.datetime_complete.timestamp())
        if isinstance(row, dict):
            previous = state["rows"].get(tid)
            if row.get("status") == "complete":
                state["done"].add(tid)
                state["rows"][tid] = (row, t.user_attrs.get("curves"))
            elif previous is None or previous[0].get("status") != "complete":
                state["rows"][tid] = (row, t.user_attrs.get("curves"))
    return state


def _claimable(study, ids) -> bool:
    """Is there a queued trial or a grid point no process has touched yet?"""
    state = _study_state(study, ids)
    return bool(state["waiting"]) or bool(set(ids) - state["attempted"])


def prepare_study(config: SweepConfig, study, owned: bool) -> None:
    """Before workers start: fail trials left RUNNING by a dead process, and queue every grid point that was
    attempted but not finished (failed, interrupted, pruned as a duplicate of a run that died)."""
    import optuna
    from optuna.trial import TrialState

    ids = [t.id for t in config.trials]
    if owned:  # our own SQLite file: nobody else is running; anything RUNNING was interrupted
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    else:
        import warnings

        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
    state = _study_state(study, ids)
    local_done = {t.id for t in config.trials if is_finished(read_trial(trial_dir(config, t)))}
    for tid in ids:
        if tid in state["attempted"] and tid not in state["done"] | state["running"] | state["waiting"] | local_done:
            study.enqueue_trial({"trial_id": tid}, user_attrs={"requeued": True})


def _compact_curves(history: list[dict]) -> dict[str, list]:
    from .pick import series

    out = {}
    for key in CURVE_KEYS:
        steps, values = series(history, key)
        if values:
            out[key] = [[s, v] for s, v in zip(steps, values)]
    return out


def _expand_curves(compact: dict | None) -> list[dict]:
    by_step: dict[int, dict] = {}
    for key, points in (compact or {}).items():
        for step, value in points:
            by_step.setdefault(int(step), {"step": int(step)})[key] = value
    return [by_step[s] for s in sorted(by_step)]


def _redirect_process_output(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def optuna_worker(config: SweepConfig, index: int = 0, log_path: str | None = None,
                  env: dict[str, str] | None = None) -> int:
    """One worker: claim grid points through the study until none is left. Runs in its own process."""
    if log_path:
        _redirect_process_output(Path(log_path))
    os.environ.update(env or {})
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    study = open_study(config, create=False)
    fn = resolve_trial_fn(config.trial_fn)
    ids = [t.id for t in config.trials]
    by_id = {t.id: t for t in config.trials}
    me = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial):
        tid = trial.suggest_categorical("trial_id", ids)
        trial.set_user_attr("worker", me)
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number or _trial_id_of(other, study.sampler) != tid:
                continue
            row = other.user_attrs.get("row") or {}
            # of two trials racing for one grid point, the older (lower number) runs it and the newer steps back;
            # a point that failed in this run is not retried by the grid sampler (only a later run requeues it)
            older_running = other.state == optuna.trial.TrialState.RUNNING and other.number < trial.number
            failed_here = row.get("status") == "failed" and not trial.user_attrs.get("requeued")
            if older_running or row.get("status") == "complete" or failed_here:
                trial.set_user_attr("duplicate_of", other.number)
                raise optuna.TrialPruned(f"{tid} is run by trial {other.number}")
        row, reused = run_trial(config, by_id[tid], fn)
        trial.set_user_attr("row", row)
        trial.set_user_attr("reused", reused)
        trial.set_user_attr("curves", _compact_curves(read_metrics(trial_dir(config, by_id[tid]) / METRICS_FILE)))
        print(status_line(row, reused), flush=True)
        if row["status"] != "complete":
            raise TrialFailed(row.get("error") or "failed")
        reward = row.get("val_reward")
        return float(reward) if isinstance(reward, (int, float)) and math.isfinite(reward) else float("nan")

    def stop_when_done(study, _trial):
        if not _claimable(study, ids):
            study.stop()

    if _claimable(study, ids):
        study.optimize(objective, catch=(TrialFailed,), callbacks=[stop_when_done])
    return 0


def _gpus(devices: str) -> list[str]:
    if devices == "cpu":
        return []
    if devices != "auto":
        return [d.strip() for d in devices.split(",") if d.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU workers
        return []


def worker_env(config: SweepConfig, index: int, gpus: list[str]) -> dict[str, str]:
    """GPU workers get one device each (round robin); CPU workers split the cores."""
    if gpus:
        env = {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}
        return {**env, "OMP_NUM_THREADS": str(config.threads)} if config.threads else env
    threads = str(config.threads or max(1, (os.cpu_count() or 1) // max(1, config.workers)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}


def run_parallel(config: SweepConfig, poll_seconds: float = 1.0) -> None:
    """Start ``config.workers`` worker processes on the shared study and report progress until they finish."""
    import multiprocessing as mp

    owned = config.storage is None
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    study = open_study(config, create=True)
    prepare_study(config, study, owned)
    ids = [t.id for t in config.trials]
    progress = Progress(len(ids), config.progress)
    by_id = {t.id: t for t in config.trials}
    started = time.time()
    reported: set[str] = set()
    state = _study_state(study, ids)
    for tid in ids:  # finished before this run: reused
        record = read_trial(trial_dir(config, by_id[tid]))
        if is_finished(record) or tid in state["done"]:
            reported.add(tid)
            progress.finished(record["row"] if is_finished(record) else state["rows"][tid][0], reused=True)

    def report_new():
        """Report trials finished since this run started (here, or on another machine through the storage)."""
        state = _study_state(study, ids)
        for tid in ids:
            if tid in reported:
                continue
            record = read_trial(trial_dir(config, by_id[tid])) or {}
            if record.get("status") in ("complete", "failed") and record.get("finished", 0) >= started:
                row = record["row"]
            elif tid in state["finished_at"] and state["finished_at"][tid] >= started:
                row = state["rows"][tid][0]
            else:
                continue
            reported.add(tid)
            progress.finished(row)

    gpus = _gpus(config.devices)
    if gpus and config.workers > len(gpus):
        print(f"note: {config.workers} workers on {len(gpus)} GPU(s): devices are shared round robin", flush=True)
    ctx = mp.get_context("spawn")
    host = socket.gethostname()
    logs = Path(config.out_dir) / "logs"
    procs = []
    try:
        for i in range(config.workers):
            p = ctx.Process(target=optuna_worker, name=f"sweep-worker-{i}",
                            args=(config, i, str(logs / f"worker-{host}-{i}.log"), worker_env(config, i, gpus)))
            p.start()
            procs.append(p)
        while any(p.is_alive() for p in procs):
            report_new()
            time.sleep(poll_seconds)
        report_new()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
        progress.close()
    bad = [p for p in procs if p.exitcode not in (0, None)]
    if bad:
        print(f"warning: {len(bad)} worker(s) exited with an error; see {logs}/", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------- report
@dataclass
class SweepResult:
    rows: list[dict]
    best: dict | None
    paths: dict[str, Path] = field(default_factory=dict)
    fit: dict | None = None

    @property
    def n_failed(self) -> int:
        return sum(r.get("status") == "failed" for r in self.rows)

    @property
    def n_complete(self) -> int:
        return sum(r.get("status") == "complete" for r in self.rows)


def collect(config: SweepConfig, study=None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows and curves of every grid point: the trial's own directory first, the shared storage second."""
    state = _study_state(study, [t.id for t in config.trials]) if study is not None else {"rows": {}}
    rows, curves = [], {}
    for trial in config.trials:
        directory = trial_dir(config, trial)
        record = read_trial(directory)
        stored, stored_curves = state["rows"].get(trial.id, (None, None))
        if is_finished(record):
            row = record["row"]
        elif stored is not None and stored.get("status") == "complete":
            row = stored
        elif record and isinstance(record.get("row"), dict):
            row = record["row"]
        elif stored is not None:
            row = stored
        elif record:
            row = {**_base_row(config, trial), "status": "interrupted" if record.get("status") == "running" else
                   record.get("status")}
        else:
            row = {**_base_row(config, trial), "status": "pending"}
        rows.append(row)
        history = read_metrics(directory / METRICS_FILE)
        curves[trial.id] = history or _expand_curves(stored_curves)
    return rows, curves


def write_report(config: SweepConfig, rows: list[dict], curves: dict[str, list[dict]]) -> SweepResult:
    from .pick import fit_exp_entropy
    from .plots import (entropy_for_scatter, plot_coef_trajectories, plot_entropy_curves, plot_reward_vs_beta,
                        plot_reward_vs_entropy)

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = pick_best(rows, config.tie_tolerance)
    title = f"β sweep: {Path(config.source or config.base_recipe).name}"
    paths: dict[str, Path] = {}
    if config.plots:
        written = {
            "reward_vs_beta": plot_reward_vs_beta(rows, out / "reward_vs_beta.png", best, title),
            "entropy_curves": plot_entropy_curves(rows, curves, out / "entropy_curves.png"),
            "coef_trajectories": plot_coef_trajectories(rows, curves, out / "coef_trajectories.png"),
        }
        scatter, fit = plot_reward_vs_entropy(rows, out / "reward_vs_entropy.png")
        written["reward_vs_entropy"] = scatter
        paths.update({k: v for k, v in written.items() if v is not None})
    else:
        pairs = [(entropy_for_scatter(r)[0], r.get("val_reward")) for r in rows if r.get("status") == "complete"]
        fit = fit_exp_entropy([h for h, _ in pairs], [reward for _, reward in pairs])
    thr = config.thresholds
    notes = [
        f"collapsed: mean training entropy over the last {thr.window:.0%} of logged steps < "
        f"{thr.collapse_fraction:g} x the mean over the first {thr.window:.0%}.",
        f"never committed: last-window mean entropy within ±{thr.commit_band:.0%} of the first-window mean AND "
        f"validation reward gained < {thr.commit_min_gain:g} over reward before.",
        "val reward: held_out_after['reward'] (or the last logged reward-like metric; see reward_source in results.csv).",
    ]
    if fit is not None:
        notes.append(f"reward vs entropy fit: R = -{fit['a']:.4g}·exp(H) + {fit['b']:.4g} (R² = {fit['r2']:.3f}, "
                     f"n = {fit['n']}).")
    paths["results.csv"] = write_results_csv(rows, out / "results.csv")
    paths["results.md"] = write_results_md(rows, best, out / "results.md", title=title, notes=notes)
    best_doc = {
        "pick": None if best is None else {k: v for k, v in best.items() if k not in ("rule", "ranking", "tied_with")},
        "rule": best["rule"] if best else None,
        "reason": best["reason"] if best else "no trial finished with a validation reward",
        "tied_with": best["tied_with"] if best else [],
        "ranking": best["ranking"] if best else [],
        "thresholds": thr.as_dict(),
        "fit_reward_vs_entropy": fit,
        "trials": {"total": len(rows), "complete": sum(r.get("status") == "complete" for r in rows),
                   "failed": sum(r.get("status") == "failed" for r in rows)},
        "base_recipe": config.base_recipe,
        "overrides": config.overrides,
    }
    if best is not None:
        best_doc["pick"]["label"] = f"β={format_coef(best['entropy_coef'])} schedule={best['schedule']}"
    write_json(out / "best.json", best_doc)
    paths["best.json"] = out / "best.json"
    return SweepResult(rows, best, paths, fit)


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
