"""Recipes (``recipes.py``): shipped recipes by path or by name, overrides, validation errors that name the key and
the file, YAML 1.2 scalars."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_entreg.recipes import RecipeError, load_recipe, packaged_recipes, parse_yaml, resolve_recipe_path

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
    with pytest.raises(RecipeError, match="no such recipe file, and not the name of a shipped recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_shipped_recipe_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"dpo_entropy", "grpo_entropy", "ppo_rlhf", "sweep_beta"} <= set(packaged_recipes())
    for name in ("dpo_entropy", "dpo_entropy.yaml"):
        assert resolve_recipe_path(name).read_text() == DPO.read_text()
    recipe = load_recipe("dpo_entropy", ["max_steps=2"])
    assert recipe["algorithm"] == "dpo" and recipe["trainer"]["output_dir"] == "runs/dpo_entropy"
    own = tmp_path / "dpo_entropy.yaml"  # a user's own file of the same name wins over the shipped one
    own.write_text(DPO.read_text().replace("seed: 0", "seed: 5"))
    assert load_recipe("dpo_entropy.yaml")["seed"] == 5
    with pytest.raises(RecipeError, match=r"dpo_entrop: no such recipe file.*'dpo_entropy'"):
        load_recipe("dpo_entrop")


def test_yaml_scalars_follow_yaml_1_2():
    assert parse_yaml("a: 1e-4\nb: no\nc: true\nd: off") == {"a": 1e-4, "b": "no", "c": True, "d": "off"}
