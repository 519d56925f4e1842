"""The synthetic trial function: run's files and signature, resume after a checkpoint, the caricatured curves."""

from __future__ import annotations

import json

import pytest

from llm_entreg.sweep.fake import fake_run


def _recipe(out, coef, **trainer):
    return {"seed": 0, "algorithm": "dpo", "source": "r.yaml",
            "trainer": {"output_dir": str(out), "entropy_coef": coef, "max_steps": 10, **trainer}}


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_files_and_resume(tmp_path):
    out = tmp_path / "t"
    logged = []
    summary = fake_run(_recipe(out, 1e-2, logging_steps=3), log=logged.append)
    assert _steps(out) == [3, 6, 9, 10] and summary["steps"] == 10 and summary["entropy_coef"] == 1e-2
    assert json.loads((out / "summary.json").read_text()) == summary
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert logged == [f"fake trial: β=0.01 reward {before['reward']} -> {after['reward']}"]
    assert len(after["per_prompt"]["reward"]) == len(after["per_prompt"]["correct"]) == 64 == before["num_prompts"]
    fake_run(_recipe(out, 1e-2))  # a fresh run starts the log over
    assert _steps(out) == list(range(1, 11))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    fake_run(_recipe(out, 1e-2), resume_from_checkpoint=str(out / "checkpoint-4"))
    assert _steps(out) == list(range(1, 11))  # continued after the checkpoint's step


def test_the_caricature(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_ENTREG_FAKE_NOISE", "0")  # expected rewards, no sampling noise
    runs = {c: fake_run(_recipe(tmp_path / str(c), c)) for c in (0.0, 1e-2, 10.0)}
    gains = {c: s["held_out_after"]["reward"] - s["held_out_before"]["reward"] for c, s in runs.items()}
    assert gains[1e-2] > 0.1 and abs(gains[0.0]) < 0.01 and abs(gains[10.0]) < 0.02  # the reward peaks in the middle
    assert runs[0.0]["held_out_after"]["entropy"] < 0.15 < 0.4 < runs[10.0]["held_out_after"]["entropy"]
    with pytest.raises(ValueError, match="entropy_coef: must be >= 0 unless allow_entropy_minimization"):
        fake_run(_recipe(tmp_path / "neg", -1.0))
    assert fake_run(_recipe(tmp_path / "neg", -1.0, allow_entropy_minimization=True))["entropy_coef"] == -1.0
