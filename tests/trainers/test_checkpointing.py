"""Checkpoints of our trainers (``trainers/checkpointing.py``), on real DPO runs: the coefficient state resumes on
the same trajectory; a damaged, missing or code-carrying state file is named; the completion marker is written last
and rotation keeps only complete checkpoints."""

from __future__ import annotations

import json

import pytest

from llm_entreg.checkpoints import COMPLETE_MARKER, checkpoint_dirs
from llm_entreg.run import run
from llm_entreg.trainers.checkpointing import STATE_FILE

from ..run_helpers import dpo_recipe, training_rows



@pytest.mark.slow
def test_controller_state_resumes_on_the_same_trajectory(tmp_path):
    common = ["max_steps=6", "save_strategy=steps", "save_steps=3", "entropy_controller=target_entropy",
              "entropy_target=5.0", "entropy_coef_delta=0.01", "entropy_coef=0.02", "evaluation.held_out=false"]
    full = run(dpo_recipe(tmp_path / "full", *common), log=lambda *a: None)
    coefs_full = [r["entropy_coef"] for r in training_rows(tmp_path / "full")]
    # A second run stopped after 3 steps, then resumed from its checkpoint in a fresh process-like set-up
    run(dpo_recipe(tmp_path / "cut", *common, "max_steps=3"), log=lambda *a: None)
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file()
    resumed = run(dpo_recipe(tmp_path / "cut", *common), resume_from_checkpoint=str(ckpt), log=lambda *a: None)
    coefs_resumed = [r["entropy_coef"] for r in training_rows(tmp_path / "cut")]
    # Entropy stays below the 5-nat target, so the controller raises c by 0.01 each step from 0.02; the bonus applies
    # from the first measurement on (step 0 has none yet, so 0 there, as in Skywork-OR1 / TRL)
    assert coefs_full == pytest.approx([0.0] + [0.02 + 0.01 * i for i in range(1, 6)])
    # metrics.jsonl of the resumed run keeps the first segment and appends the rest: the same six records
    assert coefs_resumed == pytest.approx(coefs_full)
    assert resumed["steps"] == full["steps"] == 6
    for a, b in zip(training_rows(tmp_path / "full"), training_rows(tmp_path / "cut"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)



@pytest.mark.slow
def test_corrupt_or_missing_state_file_is_a_clear_error(tmp_path):
    common = ["max_steps=2", "save_strategy=steps", "save_steps=2", "evaluation.held_out=false",
              "entropy_schedule=linear", "entropy_coef=0.1"]
    run(dpo_recipe(tmp_path, *common), log=lambda *a: None)
    ckpt = tmp_path / "checkpoint-2"
    state = ckpt / STATE_FILE
    before = sorted(p.name for p in ckpt.iterdir())
    good = state.read_bytes()
    state.write_bytes(b"x" * len(good))  # same size: only reading it back can tell
    with pytest.raises(ValueError, match=STATE_FILE + ": unreadable"):
        run(dpo_recipe(tmp_path, *common, "max_steps=4"), resume_from_checkpoint=str(ckpt), log=lambda *a: None)
    state.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=STATE_FILE + r": 16 bytes, the checkpoint recorded \d+: truncated"):
        run(dpo_recipe(tmp_path, *common, "max_steps=4"), resume_from_checkpoint=str(ckpt), log=lambda *a: None)
    state.unlink()
    with pytest.raises(ValueError, match=STATE_FILE + ": missing"):
        run(dpo_recipe(tmp_path, *common, "max_steps=4"), resume_from_checkpoint=str(ckpt), log=lambda *a: None)
    assert sorted(p.name for p in ckpt.iterdir()) == [n for n in before if n != STATE_FILE]  # nothing overwritten


@pytest.mark.slow
def test_every_checkpoint_is_marked_complete_last_and_rotation_keeps_complete_ones(tmp_path):
    run(dpo_recipe(tmp_path, "max_steps=6", "save_strategy=steps", "save_steps=2", "save_total_limit=2",
                "evaluation.held_out=false"), log=lambda *a: None)
    kept = checkpoint_dirs(tmp_path)
    assert [p.name for p in kept] == ["checkpoint-6", "checkpoint-4"]  # checkpoint-2 rotated away
    for folder in kept:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        files = {p.name for p in folder.iterdir()} - {COMPLETE_MARKER}
        assert set(marker["files"]) == files and STATE_FILE in files  # written after every other file
        newest = max((folder / name).stat().st_mtime_ns for name in files)
        assert (folder / COMPLETE_MARKER).stat().st_mtime_ns >= newest
