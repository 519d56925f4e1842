"""The report: rows from trial directories and from the study, results files, best.json with intervals and the verdict
against β = 0 (a β that wins clearly, β = 0 winning, everything inside the noise), the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_entreg.sweep.report import (SweepResult, collect, draw_plots, entropy_for_scatter, plot_metric_vs_beta,
                                     write_report, zero_position)
from llm_entreg.sweep import run_sweep
from llm_entreg.sweep.runner import run_trial, trial_dir
from llm_entreg.sweep.store import read_results_csv, write_trial
from llm_entreg.sweep.workers import open_study

from .conftest import CountingTrial


def test_report_files_and_plots(make_config):
    config = make_config(coefs="0,1e-3,1e-2,1e-1,1", schedules="constant,linear", seeds="0,1", plots=True)
    assert len(config.trials) == 18
    result = run_sweep(config, trial_fn=CountingTrial())
    out = Path(config.out_dir)
    for name in ("metric_vs_beta", "entropy_curves", "metric_vs_entropy", "coef_trajectories"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    best = json.loads((out / "best.json").read_text())
    assert best["pick"]["entropy_coef"] == result.best["entropy_coef"] and "paired difference" in best["rule"]
    assert best["correlation_metric_vs_entropy"]["n"] == 18 and len(best["ranking"]) == 9
    rows = read_results_csv(out / "results.csv")
    assert len(rows) == 18 and {"collapsed", "never_committed", "val_nll", "error", "val_pass@1", "val_pass@16",
                                "val_distinct_correct", "collapsed_held_out"} <= rows[0].keys()
    # the fake's caricature: no bonus collapses, a huge constant bonus never commits
    by_id = {r["id"]: r for r in rows}
    assert by_id["coef=0_sched=constant_seed=0"]["collapsed"] == "true"
    assert by_id["coef=1e0_sched=constant_seed=0"]["never_committed"] == "true"
    assert (out / "trials" / "coef=1e-2_sched=linear_seed=1" / "metrics.jsonl").is_file()
    assert json.loads((out / "sweep.json").read_text())["trials"][0] == "coef=0_sched=constant_seed=0"


def test_collect_reads_each_trial_directory(make_config):
    config = make_config(coefs="0,1e-3,1e-2,1e-1")
    done, failed, interrupted, pending = config.trials
    run_trial(config, done, CountingTrial())
    run_trial(config, failed, CountingTrial(fail_on={1e-3}))
    write_trial(trial_dir(config, interrupted), {"id": interrupted.id, "status": "running"})
    rows, curves = collect(config)
    assert [r["status"] for r in rows] == ["complete", "failed", "interrupted", "pending"]
    assert rows[1]["error"] == "RuntimeError: boom at beta=0.001"
    assert rows[3] == {"id": pending.id, "entropy_coef": 0.1, "schedule": "constant", "seed": 0,
                       "output_dir": f"trials/{pending.id}", "status": "pending"}
    assert [r["step"] for r in curves[done.id]] == list(range(1, 11)) and curves[pending.id] == []


def test_collect_falls_back_to_the_rows_and_curves_in_the_study(make_config, tmp_path):
    import optuna

    config = make_config(coefs="0,1e-2", workers=2, storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = open_study(config)
    row = {"id": config.trials[1].id, "entropy_coef": 0.01, "schedule": "constant", "seed": 0, "status": "complete",
           "val_reward": 0.6}
    dist = optuna.distributions.CategoricalDistribution([t.id for t in config.trials])
    study.add_trial(optuna.trial.create_trial(  # a trial another machine ran: its directory is not here
        params={"trial_id": config.trials[1].id}, distributions={"trial_id": dist}, value=0.6,
        user_attrs={"row": row, "curves": {"entropy": [[2, 0.4], [1, 0.5]], "loss": [[1, 0.7]]}}))
    rows, curves = collect(config, study)
    assert rows[0]["status"] == "pending" and rows[1] == row
    assert curves[config.trials[1].id] == [{"step": 1, "entropy": 0.5, "loss": 0.7}, {"step": 2, "entropy": 0.4}]


def test_write_report_without_plots(make_config):
    config = make_config(coefs="0,1e-2,1e-1")
    result = run_sweep(config, trial_fn=CountingTrial(fail_on={1e-1}))
    out = Path(config.out_dir)
    assert isinstance(result, SweepResult) and (result.n_complete, result.n_failed) == (2, 1)
    assert set(result.paths) == {"results.csv", "results.md", "best.json"} and not list(out.glob("*.png"))
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == {"total": 3, "complete": 2, "failed": 1} and best["overrides"] == config.overrides
    assert best["pick"]["label"] == f"β={'0' if result.best['entropy_coef'] == 0 else '1e-2'} schedule=constant"
    assert set(best) >= {"metric", "baseline", "paired_diff", "significant"} and best["metric"] == "reward"
    assert best["correlation_metric_vs_entropy"] == result.correlation
    md = (out / "results.md").read_text()
    assert ("- collapsed: mean training entropy over the last 20% of logged steps < 0.5 x the mean over the first "
            "20%; held-out:") in md
    assert "## Configurations (reward: mean over seeds [95% interval])" in md
    rows, curves = collect(config)
    again = write_report(config, rows, curves)  # the report alone, from what is on disk
    assert again.rows == result.rows and again.best == result.best


def test_nothing_to_draw():
    rows = [{"id": "a", "entropy_coef": 0.0, "schedule": "constant", "seed": 0, "status": "failed"}]
    assert draw_plots(rows, {"a": []}, "/nonexistent") == {}
    assert plot_metric_vs_beta([], "/nonexistent/x.png") is None


def test_zero_sits_left_of_the_smallest_positive_beta():
    x0, brk = zero_position([0.0, 1e-3, 1e-2, 1e-1])
    assert x0 == pytest.approx(1e-4) and brk == pytest.approx(1e-3 / 10 ** 0.5)
    x0, _ = zero_position([0.0, 1e-8, 1.0])  # 8 decades: the gap grows to 2
    assert x0 == pytest.approx(1e-10)
    assert zero_position([0.0]) == (1.0, None)
    assert entropy_for_scatter({"val_entropy": 0.3, "entropy_last": 0.2})[0] == 0.3
    assert entropy_for_scatter({"val_entropy": None, "entropy_last": 0.2})[0] == 0.2
    assert entropy_for_scatter({}) == (None, "")


@pytest.mark.parametrize("gain, noise, verdict", [
    (0.4, "0", "beyond noise"),       # a middle β gains 0.4 on every prompt: beyond noise, picked
    (-0.3, "1", "no β beat"),        # every β hurts: β = 0 is the pick
    (0.0, "1", "no β beat"),         # nothing but sampling noise: the report says so
])
def test_the_pick_and_the_report_tell_signal_from_noise(make_config, monkeypatch, gain, noise, verdict):
    monkeypatch.setenv("LLM_ENTREG_FAKE_GAIN", str(gain))
    monkeypatch.setenv("LLM_ENTREG_FAKE_NOISE", noise)
    config = make_config(coefs="0,1e-3,1e-2,1e-1", seeds="0,1,2")
    result = run_sweep(config, trial_fn=CountingTrial())
    out = Path(config.out_dir)
    best = json.loads((out / "best.json").read_text())
    md = (out / "results.md").read_text()
    assert best["baseline"]["mean"] == pytest.approx(result.best["baseline"]["mean"])
    assert len(best["baseline"]["ci95"]) == 2 and best["pick"]["seeds"] == [0, 1, 2]
    if verdict == "beyond noise":
        assert best["significant"] is True and best["pick"]["entropy_coef"] == 1e-2
        assert best["paired_diff"]["ci95"][0] > 0 and best["paired_diff"]["mean"] == pytest.approx(0.4, abs=0.05)
        assert "**beyond noise.**" in md
    else:
        assert best["significant"] is False and best["pick"]["entropy_coef"] == 0.0 and best["paired_diff"] is None
        assert "no β beat the unregularized run (β = 0) beyond noise" in best["reason"]
        assert "**no configuration beat β = 0 beyond noise.**" in md
    rows = [r for r in best["ranking"] if r["entropy_coef"] > 0]
    assert all(len(r["ci95"]) == 2 and r["paired_diff"] is not None for r in rows)
