"""The sequential runner with an injected fake trial function: resume skipping, checkpoint resume, failures,
settings changes, the report files and plots; the sweep-spec YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_entreg.sweep.runner import run_sweep, trial_dir
from llm_entreg.sweep.spec import SweepError, build_config, load_sweep_spec
from llm_entreg.sweep.store import read_results_csv, read_trial

from .conftest import DPO, ROOT, CountingTrial


def test_finished_trials_are_not_rerun(make_config):
    config = make_config()
    first = CountingTrial()
    result = run_sweep(config, trial_fn=first)
    assert len(first.calls) == 4 and result.n_complete == 4
    again = CountingTrial()
    result2 = run_sweep(make_config(), trial_fn=again)
    assert again.calls == []  # every trial.json says complete with the same fingerprint: reused
    assert [r["val_reward"] for r in result2.rows] == [r["val_reward"] for r in result.rows]
    # a trial interrupted after its checkpoint: trial.json says running, checkpoint-5 exists -> resumed from it
    directory = trial_dir(config, config.trials[2])
    record = read_trial(directory)
    record["status"] = "running"
    (directory / "trial.json").write_text(json.dumps(record))
    (directory / "checkpoint-5").mkdir()
    third = CountingTrial()
    result3 = run_sweep(make_config(), trial_fn=third)
    assert third.calls == [(1e-2, str(directory / "checkpoint-5"))]
    assert result3.rows[2]["resumed_from"] == "checkpoint-5" and result3.rows[2]["status"] == "complete"
    assert not (directory / "checkpoint-5").exists()  # checkpoints of a finished trial are removed by default


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


def test_report_files_and_plots(make_config):
    config = make_config(coefs="0,1e-3,1e-2,1e-1,1", schedules="constant,linear", seeds="0,1", plots=True)
    assert len(config.trials) == 18
    result = run_sweep(config, trial_fn=CountingTrial())
    out = Path(config.out_dir)
    for name in ("reward_vs_beta", "entropy_curves", "reward_vs_entropy", "coef_trajectories"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
    best = json.loads((out / "best.json").read_text())
    assert best["pick"]["entropy_coef"] == result.best["entropy_coef"] and "highest validation reward" in best["rule"]
    assert best["fit_reward_vs_entropy"]["n"] == 18 and len(best["ranking"]) == 9
    rows = read_results_csv(out / "results.csv")
    assert len(rows) == 18 and {"collapsed", "never_committed", "val_nll", "error"} <= rows[0].keys()
    # the fake's caricature: no bonus collapses, a huge constant bonus never commits
    by_id = {r["id"]: r for r in rows}
    assert by_id["coef=0_sched=constant_seed=0"]["collapsed"] == "true"
    assert by_id["coef=1e0_sched=constant_seed=0"]["never_committed"] == "true"
    assert (out / "trials" / "coef=1e-2_sched=linear_seed=1" / "metrics.jsonl").is_file()
    assert json.loads((out / "sweep.json").read_text())["trials"][0] == "coef=0_sched=constant_seed=0"


def test_sweep_spec_yaml(tmp_path):
    shipped = load_sweep_spec(ROOT / "recipes" / "sweep_beta.yaml")
    assert Path(shipped["base_recipe"]).resolve() == DPO.resolve()
    config = build_config(str(ROOT / "recipes" / "sweep_beta.yaml"))
    assert [t.entropy_coef for t in config.trials][:3] == [0.0, 0.0, 1e-3]
    assert config.out_dir == str(Path("runs") / "sweep_beta")
    spec = tmp_path / "my_sweep.yaml"
    spec.write_text(f"base_recipe: {DPO}\nlog_range: 1e-4:1e-1\nschedules: [constant, exponential]\nseeds: [3]\n"
                    "overrides: {max_steps: 7}\nthresholds: {collapse_fraction: 0.3}\n")
    config = build_config(str(spec), ["learning_rate=1e-3"], points=4)
    assert sorted({t.entropy_coef for t in config.trials}) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert {t.schedule for t in config.trials} == {"constant", "exponential"} and {t.seed for t in config.trials} == {3}
    assert config.overrides == ["max_steps=7", "learning_rate=1e-3"] and config.thresholds.collapse_fraction == 0.3
    assert config.out_dir == str(Path("runs") / "sweep_my_sweep")
    config = build_config(str(spec), entropy_coef="0,1", seeds="0,1")  # flags win over the spec
    assert [t.id for t in config.trials] == ["coef=0_sched=constant_seed=0", "coef=0_sched=constant_seed=1",
                                             "coef=1e0_sched=constant_seed=0", "coef=1e0_sched=constant_seed=1",
                                             "coef=1e0_sched=exponential_seed=0", "coef=1e0_sched=exponential_seed=1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base_recipe: {DPO}\nentropy_coeff: [1]\n")
    with pytest.raises(SweepError, match="unknown key"):
        build_config(str(bad))
    with pytest.raises(SweepError, match="entropy_coeff"):
        build_config(str(DPO), ["entropy_coeff=1"])


def test_last_checkpoint_matches_transformers(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    from llm_entreg.sweep.runner import last_checkpoint

    assert last_checkpoint(tmp_path) is None and last_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint-5", "checkpoint-40", "checkpoint-100", "checkpoint-x", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-500").write_text("a file, not a checkpoint")
    assert last_checkpoint(tmp_path) == get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-100")
