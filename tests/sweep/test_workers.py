"""Optuna workers on the CPU: worker processes that share one SQLite study (a killed worker's trial resumes), one
claim per queued trial, duplicate grid points stepping back, re-queueing, devices, curves in the study, and the
accelerate-launch trial function."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_entreg.launch import accelerate_command, resolve_accelerate_config
from llm_entreg.sweep import run_sweep
from llm_entreg.sweep.runner import trial_dir
from llm_entreg.sweep.store import read_trial, write_trial
from llm_entreg.sweep.workers import (accelerate_run, compact_curves, duplicate_of, expand_curves,
                                      open_study, prepare_study, visible_gpus, worker_env)


@pytest.mark.slow
def test_two_workers_share_a_sqlite_study(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENTREG_FAKE_SLEEP", "0.5")  # long enough that both workers get trials
    monkeypatch.setenv("LLM_ENTREG_FAKE_NOISE", "0")  # expected rewards: β = 1e-2 beats β = 0 beyond noise
    monkeypatch.setenv("LLM_ENTREG_FAKE_FAIL", "1")  # the β = 1 trial raises
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config = make_config(coefs="0,1e-3,1e-2,1e-1,1", workers=2, storage=storage, study_name="test-sweep",
                         trial_fn="llm_entreg.sweep.fake:fake_run", devices="cpu", plots=False)
    result = run_sweep(config)
    assert result.n_complete == 4 and result.n_failed == 1
    failed = next(r for r in result.rows if r["status"] == "failed")
    assert failed["entropy_coef"] == 1.0 and failed["error"].startswith("RuntimeError: injected failure")
    records = {t.id: read_trial(trial_dir(config, t)) for t in config.trials}
    assert len({r["pid"] for r in records.values()}) == 2  # both workers ran trials
    study = open_study(config)
    ran = [t for t in study.get_trials() if "row" in t.user_attrs]
    assert sorted(t.params["trial_id"] for t in ran) == sorted(records)  # each grid point run exactly once
    assert result.best["entropy_coef"] == 1e-2
    assert json.loads((Path(config.out_dir) / "best.json").read_text())["pick"]["entropy_coef"] == 1e-2
    # the same command again: finished trials are reused, only the failed one is queued and retried
    started = {tid: r["started"] for tid, r in records.items()}
    monkeypatch.setenv("LLM_ENTREG_FAKE_SLEEP", "0")
    again = run_sweep(config)
    assert again.n_complete == 4 and again.n_failed == 1
    for t in config.trials:
        record = read_trial(trial_dir(config, t))
        assert (record["started"] == started[t.id]) == (t.entropy_coef != 1.0), t.id


@pytest.mark.slow
def test_a_trial_whose_worker_died_is_resumed_on_the_next_run(make_config, monkeypatch):
    monkeypatch.setenv("LLM_ENTREG_FAKE_CRASH_ONCE", "0.01")  # the β = 1e-2 trial kills its worker halfway
    config = make_config(coefs="0,1e-2,1e-1", workers=2, trial_fn="llm_entreg.sweep.fake:fake_run", devices="cpu",
                         plots=False)
    first = run_sweep(config)  # default storage: <out>/optuna.db, owned by this sweep
    crashed = next(r for r in first.rows if r["entropy_coef"] == 1e-2)
    assert crashed["status"] == "interrupted"
    assert (Path(config.out_dir) / "trials" / crashed["id"] / "checkpoint-4").is_dir()
    again = run_sweep(config)  # the RUNNING trial of the dead worker is failed and re-queued; it resumes
    assert again.n_complete == 3
    row = next(r for r in again.rows if r["entropy_coef"] == 1e-2)
    assert row["resumed_from"] == "checkpoint-4"
    steps = [json.loads(line)["step"] for line in
             (Path(config.out_dir) / "trials" / row["id"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_two_workers_never_claim_the_same_queued_trial(make_config, monkeypatch):
    """Both workers see the queued trial WAITING; the one that reads it first keeps the database locked until it
    has set it RUNNING, so the other gets a trial of its own (not the same one, run twice and told twice)."""
    import optuna
    from optuna.storages._rdb import models

    config = make_config(coefs="0,1e-2", workers=2)
    study = new_study(config)
    queued = config.trials[1].id
    study.enqueue_trial({"trial_id": queued}, user_attrs={"requeued": True})
    workers = [open_study(config, create=False) for _ in range(2)]  # each with its own connections, like processes
    find = models.TrialModel.find_or_raise_by_id.__func__
    both_read = threading.Barrier(2)

    def find_then_wait(cls, trial_id, session, for_update=False):
        trial = find(cls, trial_id, session, for_update)
        if for_update and trial.state == optuna.trial.TrialState.WAITING:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait(timeout=3)  # unlocked reads meet here; with the lock the other cannot read yet
        return trial

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", classmethod(find_then_wait))
    with ThreadPoolExecutor(2) as pool:
        asked = [f.result() for f in [pool.submit(w.ask) for w in workers]]
    assert sorted(t.number for t in asked) == [0, 1]
    assert sorted(bool(t.user_attrs.get("requeued")) for t in asked) == [False, True]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: optuna.trial.TrialState.RUNNING, 1: optuna.trial.TrialState.RUNNING}


def new_study(config):
    Path(config.out_dir).mkdir(parents=True)  # the default storage, <out>/optuna.db
    return open_study(config)


def _add(study, config, tid, state, row=None):
    import optuna

    dist = optuna.distributions.CategoricalDistribution([t.id for t in config.trials])
    done = state == optuna.trial.TrialState.COMPLETE
    study.add_trial(optuna.trial.create_trial(params={"trial_id": tid}, distributions={"trial_id": dist},
                                              state=state, value=0.5 if done else None,
                                              user_attrs={"row": row} if row else {}))


def test_a_newer_trial_steps_back_from_a_grid_point_another_owns(make_config):
    from optuna.trial import TrialState

    config = make_config(coefs="0,1e-3,1e-2,1e-1", workers=2)
    ids = [t.id for t in config.trials]
    study = new_study(config)
    _add(study, config, ids[0], TrialState.COMPLETE, {"status": "complete"})  # number 0
    _add(study, config, ids[1], TrialState.RUNNING)  # number 1
    _add(study, config, ids[2], TrialState.FAIL, {"status": "failed"})  # number 2

    def trial(number, requeued=False):
        return SimpleNamespace(number=number, user_attrs={"requeued": True} if requeued else {})

    assert duplicate_of(study, trial(5), ids[0]) == 0  # finished: never run again
    assert duplicate_of(study, trial(5), ids[1]) == 1  # an older trial runs it
    assert duplicate_of(study, trial(0), ids[1]) is None  # ... but the older of the two runs it
    assert duplicate_of(study, trial(5), ids[2]) == 2  # failed in this run: not retried by the grid sampler
    assert duplicate_of(study, trial(5, requeued=True), ids[2]) is None  # a re-queued point is retried
    assert duplicate_of(study, trial(5), ids[3]) is None  # nobody has it


def test_prepare_study_fails_dead_trials_and_requeues_unfinished_points(make_config):
    from optuna.trial import TrialState

    config = make_config(coefs="0,1e-3,1e-2,1e-1", workers=2)
    ids = [t.id for t in config.trials]
    study = new_study(config)
    _add(study, config, ids[0], TrialState.RUNNING)  # its worker died
    _add(study, config, ids[1], TrialState.COMPLETE, {"status": "complete"})
    _add(study, config, ids[2], TrialState.FAIL, {"status": "failed"})
    _add(study, config, ids[3], TrialState.FAIL, {"status": "failed"})
    write_trial(trial_dir(config, config.trials[3]), {"id": ids[3], "status": "complete", "row": {}})  # done here
    prepare_study(config, study, owned=True)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["fixed_params"]["trial_id"] for t in queued) == sorted([ids[0], ids[2]])
    assert all(t.user_attrs == {"requeued": True} for t in queued)
    prepare_study(config, study, owned=True)  # queued once, not again
    assert len([t for t in study.get_trials() if t.state == TrialState.WAITING]) == 2


def test_devices_and_worker_environment(make_config, monkeypatch):
    assert visible_gpus("cpu") == [] and visible_gpus("0, 2") == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert visible_gpus("auto") == ["1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus("auto") == []
    config = make_config(coefs="0", workers=3)
    assert [worker_env(config, i, ["1", "3"]) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_env(config, 0, []) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    config = make_config(coefs="0", workers=3, threads=4)
    assert worker_env(config, 1, ["5"]) == {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "4"}
    assert worker_env(config, 1, [])["OMP_NUM_THREADS"] == "4"


def test_curves_round_trip_through_the_study():
    history = [{"step": 1, "loss": 0.7, "entropy": 0.5, "grad_norm": 3.0}, {"step": 2, "eval_loss": 0.1},
               {"step": 3, "loss": 0.6, "entropy": 0.4, "entropy_coef": 0.01, "rewards/accuracies": 0.5}]
    compact = compact_curves(history)
    assert compact == {"loss": [[1, 0.7], [3, 0.6]], "entropy": [[1, 0.5], [3, 0.4]], "entropy_coef": [[3, 0.01]],
                       "rewards/accuracies": [[3, 0.5]]}
    assert json.loads(json.dumps(compact)) == compact  # stored as a user attribute: JSON
    assert expand_curves(compact) == [{"step": 1, "loss": 0.7, "entropy": 0.5},
                                      {"step": 3, "loss": 0.6, "entropy": 0.4, "entropy_coef": 0.01,
                                       "rewards/accuracies": 0.5}]
    assert expand_curves(None) == []


def test_accelerate_run_launches_train_on_the_trial_recipe(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, len(calls) - 1, "out\n", "line 1\nline 2\nline 3\nlast line\n")

    monkeypatch.setattr("llm_entreg.sweep.workers.subprocess.run", fake_run)
    out = tmp_path / "trial"
    recipe = {"algorithm": "dpo", "seed": 0, "source": "x.yaml", "real_model": {"model": "m"},
              "launcher": {"accelerate_config": "cpu_ddp_2proc"}, "trainer": {"output_dir": str(out)}}
    logged = []
    assert accelerate_run(recipe, resume_from_checkpoint=str(out / "checkpoint-4"), log=logged.append) is None
    config = resolve_accelerate_config("cpu_ddp_2proc")
    assert calls[0] == accelerate_command(config, ["train", str(out / "recipe.yaml")]) + [
        f"--resume={out / 'checkpoint-4'}"]
    assert logged == ["launching: " + " ".join(calls[0])]
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text()) == {"algorithm": "dpo", "seed": 0,
                                                                 "trainer": {"output_dir": str(out)}}
    assert (out / "launch.log").read_text() == "out\nline 1\nline 2\nline 3\nlast line\n"
    with pytest.raises(RuntimeError, match=r"accelerate launch exited with 1: line 2 \| line 3 \| last line"):
        accelerate_run(recipe)
    assert "--resume" not in calls[1]
