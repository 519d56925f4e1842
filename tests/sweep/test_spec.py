"""Sweep settings: the sweep-spec YAML (paths, unknown keys, overrides), command-line values over the spec's,
invalid values named, accelerate config names through llm_entreg.launch, the study name and sweep.json record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_entreg.launch import resolve_accelerate_config, shipped_configs
from llm_entreg.sweep.spec import (ACCELERATE_TRIAL_FN, DEFAULT_TRIAL_FN, SPEC_KEYS, SweepError, build_config,
                                   default_out_dir, is_sweep_spec, load_sweep_spec)

from .conftest import DPO, ROOT


def test_sweep_spec_yaml(tmp_path):
    shipped = load_sweep_spec(ROOT / "recipes" / "sweep_beta.yaml")
    assert Path(shipped["base_recipe"]).resolve() == DPO.resolve()
    config = build_config(str(ROOT / "recipes" / "sweep_beta.yaml"))
    assert [t.entropy_coef for t in config.trials][:4] == [0.0, 0.0, 0.0, 1e-3]  # β = 0 once per seed
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


def test_spec_paths_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text(DPO.read_text())
    spec = tmp_path / "sub" / "sweep_x.yaml"
    spec.write_text("base_recipe: base.yaml\nentropy_coef: [0, 1.0e-2]\n"
                    "overrides: {max_steps: 7, output_dir: runs/x, bf16: false}\n")
    data = load_sweep_spec(spec)  # relative to the spec's own directory first
    assert data["base_recipe"] == str(tmp_path / "sub" / "base.yaml")
    assert data["overrides"] == ["max_steps=7", "output_dir=runs/x", "bf16=false"]  # a mapping, as key=value
    assert is_sweep_spec(spec) and not is_sweep_spec(DPO) and not is_sweep_spec(tmp_path / "missing.yaml")
    monkeypatch.chdir(tmp_path)
    spec.write_text("base_recipe: sub/base.yaml\noverrides: [max_steps=3, seed=5]\n")  # else the working directory
    assert load_sweep_spec(spec)["base_recipe"] == str(tmp_path / "sub" / "base.yaml")
    assert load_sweep_spec(spec)["overrides"] == ["max_steps=3", "seed=5"]
    config = build_config(str(spec))
    # the recipe's β; the override's seed and, the recipe being the embedded default, the next two (3 seeds)
    assert [t.id for t in config.trials] == [f"coef=2e-2_sched=constant_seed={s}" for s in (5, 6, 7)]
    assert config.out_dir == str(Path("runs") / "sweep_x")


@pytest.mark.parametrize("text, pattern", [
    ("entropy_coef: [1]\n", "a sweep spec needs a base_recipe key"),
    ("base_recipe: nowhere.yaml\n", "base_recipe 'nowhere.yaml' not found"),
    ("base_recipe: {dpo}\nentropy_coef: [1]\nlog_range: 1e-3:1e-1\n", "entropy_coef or log_range, not both"),
    ("base_recipe: {dpo}\noverrides: max_steps=3\n", "overrides: expected a mapping or a list"),
    ("base_recipe: {dpo}\nschedule: [linear]\nworker: 2\n", r"unknown key\(s\) \['schedule', 'worker'\]"),
])
def test_spec_errors_name_the_problem(tmp_path, text, pattern):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.format(dpo=DPO))
    with pytest.raises(SweepError, match=pattern):
        load_sweep_spec(spec)
    assert {"base_recipe", "entropy_coef", "accelerate_config", "threads"} <= SPEC_KEYS


@pytest.mark.parametrize("kwargs, pattern", [
    ({"workers": -2}, "--workers: must be >= 1, got -2"),
    ({"threads": 0}, "--threads: expected a positive integer, got 0"),
    ({"threads": True}, "--threads: expected a positive integer, got True"),
    ({"end_ratio": 0.0}, "--end-ratio: must be > 0"),
    ({"tie_tolerance": -0.1}, "--tie-tolerance: must be >= 0, got -0.1"),
    ({"entropy_coef": "0,1", "log_range": "1e-3:1e-1"}, "--entropy-coef or --log-range, not both"),
    ({"schedules": "constant,warp"}, "unknown schedule 'warp'"),
    ({"seeds": "0,x"}, "integers"),
    ({"thresholds": {"window": 0.6}}, r"window: must be in \(0.0, 0.5\], got 0.6"),
    ({"thresholds": {"collapse_fraction": 0}}, "collapse_fraction: must be in"),
    ({"accelerate_config": "no_such_config"}, "no config 'no_such_config'"),
])
def test_invalid_values_are_named(tmp_path, kwargs, pattern):
    with pytest.raises(SweepError, match=pattern):
        build_config(str(DPO), out=str(tmp_path / "s"), **kwargs)


def test_command_line_values(tmp_path):
    config = build_config(str(DPO), ["max_steps=5"], log_range="1e-3:1e-1", points=3, include_zero=True,
                          schedules="linear", seeds="1,2", end_ratio=0.1, tie_tolerance=0.02, workers=3, threads=2,
                          thresholds={"window": 0.25, "commit_band": None}, out=str(tmp_path / "s"))
    assert sorted({t.entropy_coef for t in config.trials}) == [0.0, 1e-3, 1e-2, 1e-1]
    assert len(config.trials) == 8 and {t.schedule for t in config.trials} == {"constant", "linear"}  # β = 0: constant
    assert (config.workers, config.threads, config.end_ratio, config.tie_tolerance) == (3, 2, 0.1, 0.02)
    assert config.thresholds.window == 0.25 and config.thresholds.commit_band == 0.1  # None keeps the default
    assert config.parallel and config.trial_fn == DEFAULT_TRIAL_FN and config.overrides == ["max_steps=5"]
    plain = build_config(str(DPO), out=str(tmp_path / "p"))  # the embedded default: three seeds by default
    assert [t.id for t in plain.trials] == [f"coef=2e-2_sched=constant_seed={s}" for s in (0, 1, 2)]
    assert not plain.parallel and plain.pick_metric == "reward"
    assert build_config(str(DPO), out=str(tmp_path / "q"), pick_metric="pass@16").pick_metric == "pass@16"
    with pytest.raises(SweepError, match="--pick-metric: expected reward, nll or pass@K"):
        build_config(str(DPO), out=str(tmp_path / "q"), pick_metric="accuracy")
    assert default_out_dir("recipes/dpo_entropy.yaml") == str(Path("runs") / "sweep_dpo_entropy")
    assert default_out_dir("recipes/sweep_beta.yaml") == str(Path("runs") / "sweep_beta")


def test_accelerate_config_names_resolve_through_llm_entreg_launch(tmp_path):
    assert "cpu_ddp_2proc" in shipped_configs()
    config = build_config(str(DPO), out=str(tmp_path / "s"), accelerate_config="cpu_ddp_2proc")
    assert config.accelerate_config == "cpu_ddp_2proc" and config.trial_fn == ACCELERATE_TRIAL_FN
    assert ACCELERATE_TRIAL_FN == "llm_entreg.sweep.workers:accelerate_run"
    assert resolve_accelerate_config(config.accelerate_config).name == "cpu_ddp_2proc.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("compute_environment: LOCAL_MACHINE\n")
    config = build_config(str(DPO), out=str(tmp_path / "s"), accelerate_config=str(own), trial_fn="m:f")
    assert config.accelerate_config == str(own) and config.trial_fn == "m:f"  # an explicit trial function stays
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base_recipe: {DPO}\naccelerate_config: cpu_ddp_2proc.yaml\n")
    assert build_config(str(spec), out=str(tmp_path / "s")).accelerate_config == "cpu_ddp_2proc.yaml"
    with pytest.raises(SweepError, match=r"known names: \[.*'cpu_ddp_2proc'"):
        build_config(str(DPO), out=str(tmp_path / "s"), accelerate_config="cpu_ddp_3proc")


def test_study_name_and_record(tmp_path):
    def make(**kwargs):
        return build_config(str(DPO), ["max_steps=5"], entropy_coef="0,1e-2", out=str(tmp_path / "beta"), seeds="0",
                            **kwargs)

    config = make(workers=2)
    name = config.resolved_study_name()
    assert name.startswith("beta-") and len(name) == len("beta-") + 8
    assert make(workers=2).resolved_study_name() == name  # the same command: the same study
    assert build_config(str(DPO), ["max_steps=6"], entropy_coef="0,1e-2", out=str(tmp_path / "beta"), seeds="0",
                        workers=2).resolved_study_name() != name
    assert make(study_name="mine").resolved_study_name() == "mine"
    record = json.loads(json.dumps(config.record()))  # JSON-able
    assert record["trials"] == ["coef=0_sched=constant_seed=0", "coef=1e-2_sched=constant_seed=0"]
    assert record["study_name"] == name and record["trial_fn"] == DEFAULT_TRIAL_FN and record["workers"] == 2
    assert record["thresholds"]["collapse_fraction"] == 0.5 and "recipes" not in record
    assert make().record()["study_name"] is None
