"""Optuna mode on the CPU: two worker processes claim grid points through one shared SQLite study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_entreg.sweep.runner import open_study, run_sweep, trial_dir
from llm_entreg.sweep.store import read_trial

pytestmark = pytest.mark.slow


def test_two_workers_share_a_sqlite_study(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENTREG_FAKE_SLEEP", "0.5")  # long enough that both workers get trials
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config = make_config(coefs="0,1e-3,1e-2,1e-1,-1", workers=2, storage=storage, study_name="test-sweep",
                         trial_fn="llm_entreg.sweep.fake:fake_run", devices="cpu", plots=False)
    result = run_sweep(config)
    assert result.n_complete == 4 and result.n_failed == 1
    failed = next(r for r in result.rows if r["status"] == "failed")
    assert failed["entropy_coef"] == -1.0 and failed["error"].startswith("ValueError: entropy_coef")
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
        assert (record["started"] == started[t.id]) == (t.entropy_coef != -1.0), t.id


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
