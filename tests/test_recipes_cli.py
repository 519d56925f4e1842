"""Recipes and the CLI: overrides, validation errors that name the key, and bad data/model inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_entreg.cli import main
from llm_entreg.recipes import RecipeError, load_recipe
from llm_entreg.run import _check_columns, _load_model

ROOT = Path(__file__).resolve().parents[1]
DPO = ROOT / "recipes" / "dpo_entropy.yaml"


def test_shipped_recipe_loads_and_overrides_apply():
    recipe = load_recipe(DPO, ["entropy_coef=1e-4", "max_steps=3", "model.name_or_path=/x/y", "seed=7"])
    assert recipe["trainer"]["entropy_coef"] == pytest.approx(1e-4)  # YAML's "1e-4" string becomes a number
    assert recipe["trainer"]["max_steps"] == 3
    assert recipe["model"]["name_or_path"] == "/x/y"
    assert recipe["seed"] == 7
    assert recipe["trainer"]["output_dir"] == "runs/dpo_entropy"


def test_real_flag_switches_to_real_ids():
    recipe = load_recipe(DPO, real=True)
    assert recipe["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert recipe["data"]["train"] == "trl-lib/ultrafeedback_binarized"
    assert recipe["trainer"]["bf16"] is True


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["entropy_coeff=0.1"], r"entropy_coeff.*did you mean 'entropy_coef'"),
        (["model.nme_or_path=x"], r"nme_or_path.*did you mean 'name_or_path'"),
        (["entropy_coef"], r"key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(DPO, overrides)


def test_unknown_recipe_keys_name_key_and_file(tmp_path):
    raw = yaml.safe_load(DPO.read_text())
    raw["trainer"]["learnin_rate"] = 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"bad.yaml: trainer.learnin_rate.*did you mean 'learning_rate'"):
        load_recipe(bad)
    raw = yaml.safe_load(DPO.read_text())
    raw["evaluatoin"] = {}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"evaluatoin.*did you mean 'evaluation'"):
        load_recipe(bad)
    assert main(["train", str(bad)]) == 2  # the CLI reports it and exits non-zero
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_missing_columns_and_missing_model_path_are_clear(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]})
    with pytest.raises(ValueError, match=r"my data.*missing column\(s\) \['rejected'\]"):
        _check_columns(ds, ("prompt", "chosen", "rejected"), "my data", None)
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: '/nonexistent/model' does not exist"):
        _load_model("/nonexistent/model", "model.name_or_path")
    assert main(["train", str(DPO), "model.name_or_path=/nonexistent/model", f"output_dir={tmp_path}"]) == 1
