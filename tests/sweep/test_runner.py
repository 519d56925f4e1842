"""One trial and the sequential runner, with an injected fake trial function: resume skipping, checkpoint resume,
failures, settings changes, fingerprints, trial functions by name, the progress line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm_entreg.checkpoints import write_marker
from llm_entreg.sweep import run_sweep as exported_run_sweep
from llm_entreg.sweep import run_sweep
from llm_entreg.sweep.runner import (base_row, fingerprint, last_checkpoint, resolve_trial_fn, run_trial, status_line,
                                     trial_dir, trial_recipe)
from llm_entreg.sweep.spec import SweepError
from llm_entreg.sweep.store import read_results_csv, read_trial

from .conftest import CountingTrial


def test_finished_trials_are_not_rerun(make_config):
    config = make_config()
    first = CountingTrial()
    result = run_sweep(config, trial_fn=first)
    assert len(first.calls) == 4 and result.n_complete == 4
    again = CountingTrial()
    result2 = run_sweep(make_config(), trial_fn=again)
    assert again.calls == []  # every trial.json says complete with the same fingerprint: reused
    assert [r["val_reward"] for r in result2.rows] == [r["val_reward"] for r in result.rows]
    # a trial interrupted after its checkpoint: trial.json says running, checkpoint-5 is complete (checkpoint-6
    # was still being written) -> resumed from checkpoint-5
    directory = trial_dir(config, config.trials[2])
    record = read_trial(directory)
    record["status"] = "running"
    (directory / "trial.json").write_text(json.dumps(record))
    (directory / "checkpoint-5").mkdir()
    write_marker(directory / "checkpoint-5", 5)
    (directory / "checkpoint-6").mkdir()
    third = CountingTrial()
    result3 = run_sweep(make_config(), trial_fn=third)
    assert third.calls == [(1e-2, str(directory / "checkpoint-5"))]
    assert result3.rows[2]["resumed_from"] == "checkpoint-5" and result3.rows[2]["status"] == "complete"
    assert not (directory / "checkpoint-5").exists()  # checkpoints of a finished trial are removed by default
    assert not (directory / "checkpoint-6").exists()


def test_failed_trial_is_recorded_and_does_not_stop_the_sweep(make_config):
    config = make_config()
    fn = CountingTrial(fail_on={1e-2})
    result = run_sweep(config, trial_fn=fn)
    assert len(fn.calls) == 4 and result.n_failed == 1 and result.n_complete == 3
    failed = next(r for r in result.rows if r["status"] == "failed")
    assert failed["id"] == "coef=1e-2_sched=constant_seed=0" and failed["error"] == "RuntimeError: boom at beta=0.01"
    tb = (trial_dir(config, config.trials[2]) / "traceback.txt").read_text()
    assert "RuntimeError: boom" in tb and "Traceback" in tb
    assert result.best["entropy_coef"] != 1e-2
    csv_rows = read_results_csv(Path(config.out_dir) / "results.csv")
    assert [r["status"] for r in csv_rows] == ["complete", "complete", "failed", "complete"]
    assert "boom" in (Path(config.out_dir) / "results.md").read_text()
    retry = CountingTrial()  # a re-run retries only the failed trial
    assert run_sweep(make_config(), trial_fn=retry).n_failed == 0 and retry.calls == [(1e-2, None)]


def test_changed_settings_are_refused_in_the_same_directory(make_config):
    run_sweep(make_config(coefs="1e-3"), trial_fn=CountingTrial())
    with pytest.raises(SweepError, match="other settings"):
        run_sweep(make_config(coefs="1e-3", overrides=("max_steps=12",)), trial_fn=CountingTrial())


def test_an_invalid_trial_config_stops_the_sweep_before_any_trial_runs(make_config, tmp_path):
    trial = CountingTrial()
    with pytest.raises(SweepError, match=r"trial coef=-1e0_sched=constant_seed=0: .*entropy_coef: got -1.0 < 0"):
        run_sweep(make_config(coefs="0,-1"), trial_fn=trial)
    assert trial.calls == [] and not (tmp_path / "sweep" / "trials").exists()


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    assert last_checkpoint(tmp_path) is None and last_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint-5", "checkpoint-40", "checkpoint-100", "checkpoint-x", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-500").write_text("a file, not a checkpoint")
    assert last_checkpoint(tmp_path) is None  # none is marked complete
    for name in ("checkpoint-5", "checkpoint-40"):
        write_marker(tmp_path / name, int(name.split("-")[1]))
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-40")  # checkpoint-100 was still being written


def test_run_trial_records_the_row_and_reuses_it(make_config):
    config = make_config(coefs="1e-2")
    trial = config.trials[0]
    def loud_trial(recipe, resume_from_checkpoint=None, log=print):
        os.write(1, b"written to file descriptor 1\n")  # as C code or a subprocess would
        return CountingTrial()(recipe, resume_from_checkpoint, log)

    row, reused = run_trial(config, trial, loud_trial)
    assert reused is False and row["status"] == "complete" and row["error"] is None
    assert row["id"] == "coef=1e-2_sched=constant_seed=0" and row["output_dir"] == "trials/" + row["id"]
    assert row["steps"] == 10 and row["resumed_from"] is None and row["val_reward"] == pytest.approx(0.5, abs=0.1)
    record = read_trial(trial_dir(config, trial))
    assert record["status"] == "complete" and record["row"] == row and record["params"] == trial.params()
    assert record["overrides"][-4:] == ["entropy_coef=0.01", "entropy_schedule=null", "entropy_controller=null",
                                        "seed=0"]
    assert (trial_dir(config, trial) / "trial.log").read_text() == "written to file descriptor 1\n"
    fn = CountingTrial()
    assert run_trial(config, trial, fn) == (row, True) and fn.calls == []


def test_trial_recipe_and_fingerprint(make_config):
    config = make_config(coefs="1e-3,1e-2")
    recipe = trial_recipe(config, config.trials[1])
    assert recipe["trainer"]["output_dir"] == str(Path(config.out_dir) / "trials" / config.trials[1].id)
    assert recipe["trainer"]["entropy_coef"] == 0.01 and recipe["trainer"]["max_steps"] == 10
    assert recipe["trainer"]["disable_tqdm"] is True and "launcher" not in recipe
    fp = fingerprint(recipe, "m:f")
    moved = {**recipe, "trainer": {**recipe["trainer"], "output_dir": "elsewhere"}}
    assert fingerprint(moved, "m:f") == fp  # paths do not decide a result
    assert fingerprint(recipe, "m:g") != fp  # the trial function does
    assert fingerprint(trial_recipe(config, config.trials[0]), "m:f") != fp  # and so do the axis values
    assert len(fp) == 16 and base_row(config.trials[1]) == {"id": config.trials[1].id, "entropy_coef": 0.01,
                                                            "schedule": "constant", "seed": 0,
                                                            "output_dir": f"trials/{config.trials[1].id}"}


def test_trial_functions_by_name():
    from llm_entreg.sweep.fake import fake_run

    assert resolve_trial_fn("llm_entreg.sweep.fake:fake_run") is fake_run and resolve_trial_fn(print) is print
    with pytest.raises(SweepError, match="MODULE:FUNCTION"):
        resolve_trial_fn("llm_entreg.sweep.fake.fake_run")
    with pytest.raises(SweepError, match="cannot import 'llm_entreg.sweep.fake:missing'"):
        resolve_trial_fn("llm_entreg.sweep.fake:missing")


def test_status_line():
    row = {"id": "t", "status": "complete", "val_reward": 0.51234, "val_nll": 0.3, "entropy_first": 0.45,
           "entropy_last": 0.1, "collapsed": True, "never_committed": False, "seconds": 12.4, "resumed_from": None}
    assert status_line(row, done=2, total=5) == "[2/5] t: reward 0.5123 nll 0.3 H 0.45->0.1 [collapsed] (12 s)"
    assert status_line({**row, "resumed_from": "checkpoint-4"}).endswith("(12 s, resumed from checkpoint-4)")
    assert status_line(row, reused=True).endswith("[collapsed] (reused)")
    assert status_line({"id": "t", "status": "failed", "error": "ValueError: x"}) == "t: FAILED ValueError: x"
    assert exported_run_sweep is run_sweep
