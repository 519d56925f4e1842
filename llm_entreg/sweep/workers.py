"""Parallel sweeps: worker processes that claim grid points through an Optuna study in shared storage (SQLite on
one machine, any RDB URL across machines), their devices and environment, and the trial function that runs a
trial under ``accelerate launch``. See docs/sweep.md ("Parallel and multi-machine mode").
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..launch import accelerate_command, resolve_accelerate_config
from .pick import COEF_KEYS, ENTROPY_KEYS, REWARD_KEYS, series
from .runner import Progress, resolve_trial_fn, run_trial, status_line, trial_dir
from .spec import ACCELERATE_TRIAL_FN, SweepConfig  # noqa: F401 - the name of accelerate_run below
from .store import METRICS_FILE, is_finished, read_metrics, read_trial

CURVE_KEYS = ("loss", *ENTROPY_KEYS, *COEF_KEYS, *REWARD_KEYS)


class TrialFailed(RuntimeError):
    """Raised inside an Optuna objective after a failure was recorded, so Optuna marks the trial FAIL."""


# -------------------------------------------------------------------------------------------------------- storage
def default_storage(config: SweepConfig) -> str:
    return f"sqlite:///{(Path(config.out_dir) / 'optuna.db').resolve()}"


def begin_immediate(connection) -> None:
    """Start an SQLite transaction holding the database's write lock (``BEGIN IMMEDIATE``).

    Python's sqlite3 driver would only open a transaction at the first write, so the read and the update in
    Optuna's "set a queued trial RUNNING unless another process did" ran unlocked, and two workers could both
    claim one queued trial (both then ran it, and the second to finish failed with "Cannot tell a COMPLETE
    trial"). With every transaction taking the lock first, they run one after another."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_storage(url: str, heartbeat: int = 60):
    """An Optuna RDB storage with heartbeats, re-queueing trials whose worker died (SQLite: serialized
    transactions with a 60 s lock timeout)."""
    import warnings

    import optuna
    import sqlalchemy
    from optuna import storages

    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:  # isolation_level=None: the driver leaves transactions to begin_immediate
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60, "isolation_level": None}}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they have been there since 2.x
        warnings.simplefilter("ignore")
        if heartbeat and heartbeat > 0:
            if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            else:
                kwargs["failed_trial_callback"] = storages.RetryFailedTrialCallback(max_retry=3)
            kwargs.update(heartbeat_interval=int(heartbeat), grace_period=int(heartbeat) * 3)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = storages.RDBStorage(url, **kwargs)
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", begin_immediate)
    return storage


def grid_sampler(config: SweepConfig):
    """Optuna's GridSampler over ``trial_id`` (fixed shuffle seed: the same grid in every process)."""
    from optuna.samplers import GridSampler

    class SweepGridSampler(GridSampler):
        """GridSampler that leaves stopping to the workers (they stop when no grid point is left unclaimed), so
        re-queued trials are not dropped when the grid looks exhausted."""

        def after_trial(self, study, trial, state, values):
            return None

    return SweepGridSampler({"trial_id": [t.id for t in config.trials]}, seed=0)


def open_study(config: SweepConfig, create: bool = True):
    """The sweep's study in ``config.storage`` (default ``<out>/optuna.db``), created if ``create``."""
    import optuna

    storage = make_storage(config.storage or default_storage(config), config.heartbeat)
    name = config.resolved_study_name()
    if create:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                   sampler=grid_sampler(config), load_if_exists=True)
    return optuna.load_study(study_name=name, storage=storage, sampler=grid_sampler(config))


# ---------------------------------------------------------------------------------------------------- study state
def trial_id_of(t, sampler=None) -> str | None:
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


def study_state(study, ids) -> dict[str, Any]:
    """Per grid id: done (a complete row), running, waiting, attempted; plus rows from the storage."""
    from optuna.trial import TrialState

    state = {"done": set(), "running": set(), "waiting": set(), "attempted": set(), "rows": {}, "finished_at": {}}
    for t in study.get_trials(deepcopy=False):
        tid = trial_id_of(t)
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


def claimable(study, ids) -> bool:
    """Is there a queued trial or a grid point no process has touched yet?"""
    state = study_state(study, ids)
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
    state = study_state(study, ids)
    local_done = {t.id for t in config.trials if is_finished(read_trial(trial_dir(config, t)))}
    for tid in ids:
        if tid in state["attempted"] and tid not in state["done"] | state["running"] | state["waiting"] | local_done:
            study.enqueue_trial({"trial_id": tid}, user_attrs={"requeued": True})


def compact_curves(history: list[dict]) -> dict[str, list]:
    """The logged curves worth keeping in the study: ``{key: [[step, value], ...]}`` for :data:`CURVE_KEYS`."""
    out = {}
    for key in CURVE_KEYS:
        steps, values = series(history, key)
        if values:
            out[key] = [[s, v] for s, v in zip(steps, values)]
    return out


def expand_curves(compact: dict | None) -> list[dict]:
    """:func:`compact_curves` back to records ``{"step": s, key: value, ...}``, in step order."""
    by_step: dict[int, dict] = {}
    for key, points in (compact or {}).items():
        for step, value in points:
            by_step.setdefault(int(step), {"step": int(step)})[key] = value
    return [by_step[s] for s in sorted(by_step)]


# ------------------------------------------------------------------------------------------------------ a worker
def duplicate_of(study, trial, tid: str) -> int | None:
    """The number of another Optuna trial that owns grid point ``tid`` (so ``trial`` must step back), or None."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or trial_id_of(other, study.sampler) != tid:
            continue
        row = other.user_attrs.get("row") or {}
        # of two trials racing for one grid point, the older (lower number) runs it and the newer steps back;
        # a point that failed in this run is not retried by the grid sampler (only a later run requeues it)
        older_running = other.state == TrialState.RUNNING and other.number < trial.number
        failed_here = row.get("status") == "failed" and not trial.user_attrs.get("requeued")
        if older_running or row.get("status") == "complete" or failed_here:
            return other.number
    return None


def make_objective(config: SweepConfig, study, fn: Callable) -> Callable:
    """The Optuna objective: run the trial's grid point (unless another trial owns it) and store its row."""
    import optuna

    ids = [t.id for t in config.trials]
    by_id = {t.id: t for t in config.trials}
    me = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial):
        tid = trial.suggest_categorical("trial_id", ids)
        trial.set_user_attr("worker", me)
        other = duplicate_of(study, trial, tid)
        if other is not None:
            trial.set_user_attr("duplicate_of", other)
            raise optuna.TrialPruned(f"{tid} is run by trial {other}")
        row, reused = run_trial(config, by_id[tid], fn)
        trial.set_user_attr("row", row)
        trial.set_user_attr("reused", reused)
        trial.set_user_attr("curves", compact_curves(read_metrics(trial_dir(config, by_id[tid]) / METRICS_FILE)))
        print(status_line(row, reused), flush=True)
        if row["status"] != "complete":
            raise TrialFailed(row.get("error") or "failed")
        reward = row.get("val_reward")
        return float(reward) if isinstance(reward, (int, float)) and math.isfinite(reward) else float("nan")

    return objective


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
    objective = make_objective(config, study, resolve_trial_fn(config.trial_fn))
    ids = [t.id for t in config.trials]

    def stop_when_done(study, _trial):
        if not claimable(study, ids):
            study.stop()

    if claimable(study, ids):
        study.optimize(objective, catch=(TrialFailed,), callbacks=[stop_when_done])
    return 0


# -------------------------------------------------------------------------------------------------- the workers
def visible_gpus(devices: str) -> list[str]:
    """The GPU ids workers share: ``cpu`` none, a list as given, ``auto`` the visible ones."""
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


class FinishedTrials:
    """Reports each grid point once as it finishes, here or on another machine (through the storage)."""

    def __init__(self, config: SweepConfig, study, progress: Progress):
        self.config, self.study, self.progress = config, study, progress
        self.by_id = {t.id: t for t in config.trials}
        self.started = time.time()
        self.reported: set[str] = set()

    def report_reused(self) -> None:
        """Trials finished before this run started."""
        state = study_state(self.study, list(self.by_id))
        for tid, trial in self.by_id.items():
            record = read_trial(trial_dir(self.config, trial))
            if is_finished(record) or tid in state["done"]:
                self.reported.add(tid)
                self.progress.finished(record["row"] if is_finished(record) else state["rows"][tid][0], reused=True)

    def report_new(self) -> None:
        """Trials finished since this run started."""
        state = study_state(self.study, list(self.by_id))
        for tid, trial in self.by_id.items():
            if tid in self.reported:
                continue
            record = read_trial(trial_dir(self.config, trial)) or {}
            if record.get("status") in ("complete", "failed") and record.get("finished", 0) >= self.started:
                row = record["row"]
            elif tid in state["finished_at"] and state["finished_at"][tid] >= self.started:
                row = state["rows"][tid][0]
            else:
                continue
            self.reported.add(tid)
            self.progress.finished(row)


def start_workers(config: SweepConfig, logs: Path, procs: list) -> None:
    """Spawn ``config.workers`` processes running :func:`optuna_worker` (each with its devices and log file)
    into ``procs``; a list the caller holds, so an interrupt while starting still reaches those started."""
    import multiprocessing as mp

    gpus = visible_gpus(config.devices)
    if gpus and config.workers > len(gpus):
        print(f"note: {config.workers} workers on {len(gpus)} GPU(s): devices are shared round robin", flush=True)
    ctx = mp.get_context("spawn")
    host = socket.gethostname()
    for i in range(config.workers):
        p = ctx.Process(target=optuna_worker, name=f"sweep-worker-{i}",
                        args=(config, i, str(logs / f"worker-{host}-{i}.log"), worker_env(config, i, gpus)))
        p.start()
        procs.append(p)


def run_parallel(config: SweepConfig, poll_seconds: float = 1.0) -> None:
    """Start ``config.workers`` worker processes on the shared study and report progress until they finish."""
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    study = open_study(config, create=True)
    prepare_study(config, study, owned=config.storage is None)
    progress = Progress(len(config.trials), config.progress)
    finished = FinishedTrials(config, study, progress)
    finished.report_reused()
    logs = Path(config.out_dir) / "logs"
    procs: list = []
    try:
        start_workers(config, logs, procs)
        while any(p.is_alive() for p in procs):
            finished.report_new()
            time.sleep(poll_seconds)
        finished.report_new()
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


# --------------------------------------------------------------------------------------- a multi-process trial
def accelerate_run(recipe: dict, resume_from_checkpoint=None, log=print):
    """A trial function that runs ``llm-entreg train`` on the trial's recipe under ``accelerate launch``.

    The recipe is written to ``<trial dir>/recipe.yaml`` and the launcher's output to ``launch.log``; the
    trial's ``summary.json`` and ``metrics.jsonl`` land in the trial directory, where the runner reads them."""
    import yaml

    config = resolve_accelerate_config(recipe["launcher"]["accelerate_config"])
    out_dir = Path(recipe["trainer"]["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in recipe.items() if k not in ("source", "launcher", "real_model")}
    path = out_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    cmd = accelerate_command(config, ["train", str(path)])
    if resume_from_checkpoint:
        cmd += [f"--resume={resume_from_checkpoint}"]
    log("launching: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    (out_dir / "launch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}: {' | '.join(tail)[:400]}")
    # returns nothing: the runner reads summary.json from the trial directory
