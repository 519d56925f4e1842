"""Pseudo-label self-training (``pseudo_label.py``): the spec's checks, ECE and the pool statistics by hand, the round
dataset's entropy flags, the recipe section, and a short end-to-end loop that writes its per-round record."""

from __future__ import annotations

import json

import pytest

from llm_entreg import pseudo_label
from llm_entreg.pseudo_label import (PseudoLabelSpec, expected_calibration_error, label_pool, split_problems)
from llm_entreg.recipes import RecipeError, load_recipe
from llm_entreg.tasks.data import Problem


@pytest.mark.parametrize("fields, message", [
    ({"rounds": 0}, "pseudo_label.rounds: expected a positive integer"),
    ({"threshold": 1.5}, r"pseudo_label.threshold: expected a number in \(0, 1\]"),
    ({"teacher": "student"}, "pseudo_label.teacher: expected one of"),
    ({"ema_decay": 1.0}, r"pseudo_label.ema_decay: expected a number in \[0, 1\)"),
])
def test_the_spec_names_a_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        PseudoLabelSpec(**fields)


def test_expected_calibration_error_by_hand():
    # bin [0.9, 1.0]: confidences 0.95, 0.95, accuracy 1/2 -> gap 0.45, weight 2/4; bin [0.2, 0.3): 0.25, 0.25,
    # accuracy 0 -> gap 0.25, weight 2/4
    assert expected_calibration_error([0.95, 0.95, 0.25, 0.25], [True, False, False, False]) == pytest.approx(0.35)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0


def test_the_pool_statistics_by_hand(monkeypatch):
    pool = [Problem("add", "17+1=", "18"), Problem("add", "2+2=", "4"), Problem("add", "27+3=", "30"),
            Problem("add", "5+5=", "10")]
    answers = ["19", "4", "31", "10"]  # wrong, right, wrong, right
    confidence = [0.95, 0.99, 0.5, 0.92]
    monkeypatch.setattr(pseudo_label, "greedy_answers", lambda model, tok, problems: (answers, confidence, [0.1] * 4))
    kept, stats = label_pool(None, None, pool, threshold=0.9)
    assert [(p.prompt, a) for p, a in kept] == [("17+1=", "19"), ("2+2=", "4"), ("5+5=", "10")]
    assert stats == {"coverage": 0.75, "pseudo_accuracy": pytest.approx(2 / 3), "confident_wrong_share": 0.25,
                     "slice_confident_wrong_share": 0.5}  # 17+1 and 27+3 are the slice; one of them kept wrong
    data = pseudo_label._round_dataset([Problem("add", "1+1=", "2")], kept)
    assert data["entropy_mask"] == [0, 1, 1, 1] and data["completion"][1] == "19"


def test_the_problems_are_disjoint_and_sized():
    spec = PseudoLabelSpec(labeled=16, pool=64, eval_prompts=32)
    labeled, pool, test = split_problems(0, spec)
    assert (len(labeled), len(pool), len(test)) == (16, 64, 32)
    prompts = [set(p.prompt for p in part) for part in (labeled, pool, test)]
    assert not prompts[0] & prompts[1] and not (prompts[0] | prompts[1]) & prompts[2]


def test_the_recipe_section_is_checked():
    recipe = load_recipe("pseudo_label", ["pseudo_label.rounds=2", "output_dir=/tmp/unused"])
    assert recipe["pseudo_label"]["rounds"] == 2 and recipe["algorithm"] == "sft"
    with pytest.raises(RecipeError, match="unknown key 'round' in pseudo_label; did you mean 'rounds'"):
        load_recipe("pseudo_label", ["pseudo_label.round=2"])
    with pytest.raises(RecipeError, match=r"pseudo_label.threshold: expected a number in \(0, 1\]"):
        load_recipe("pseudo_label", ["pseudo_label.threshold=2"])
    with pytest.raises(RecipeError, match="pseudo_label: the self-training loop trains with algorithm 'sft'"):
        load_recipe("dpo_entropy", ["pseudo_label.rounds=2"])


@pytest.mark.slow
def test_a_short_loop_writes_its_rounds_and_summary(tmp_path):
    from llm_entreg.run import run

    recipe = load_recipe("pseudo_label", [f"output_dir={tmp_path}", "pseudo_label.rounds=2", "pseudo_label.pool=128",
                                          "pseudo_label.steps_per_round=5", "pseudo_label.eval_prompts=64",
                                          "pseudo_label.teacher=ema"])
    summary = run(recipe, log=lambda *a: None)
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2] and summary["rounds"] == rounds
    assert rounds[0]["slice_accuracy"] < 0.3  # the warm start is wrong on its slice
    assert {"coverage", "pseudo_accuracy", "confident_wrong_share", "ece", "accuracy"} <= rounds[1].keys()
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["held_out_after"]["accuracy"] == rounds[-1]["accuracy"]
