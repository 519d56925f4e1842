"""A run's life around the trainer (``lifecycle.py``): the checkpoint resume picks, the used output directory,
metrics trimmed to the resumed step, changed settings named, SIGTERM turned into save-and-stop."""

from __future__ import annotations

import json
import os
import signal
import types

import pytest

from llm_entreg.checkpoints import write_marker
from llm_entreg.lifecycle import (
    Preempted, RunError, StopOnSignal, changed_settings, clear_run, resolve_resume, resumed_step, run_contents,
    trim_metrics,
)


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_marker(folder, step)
    return folder


def test_resume_true_takes_the_newest_complete_checkpoint_and_names_the_skipped_one(tmp_path):
    _checkpoint(tmp_path, 150)
    _checkpoint(tmp_path, 200, complete=False)
    said = []
    assert resolve_resume(tmp_path, True, log=said.append) == str(tmp_path / "checkpoint-150")
    assert "skipping" in said[0] and "checkpoint-200" in said[0] and "still being written" in said[0]
    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path, False) is None
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-150"), log=said.append).endswith("checkpoint-150")


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    _checkpoint(tmp_path, 10, complete=False)
    with pytest.raises(RunError, match=r"no complete checkpoint in .* \(skipped 1 incomplete\)"):
        resolve_resume(tmp_path, True, log=lambda *a: None)
    with pytest.raises(RunError, match="resume_from_checkpoint: .*nowhere is not a directory"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_run_contents_lists_run_files_and_checkpoints_and_clear_run_keeps_the_rest(tmp_path):
    assert run_contents(tmp_path / "missing") == [] and run_contents(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    assert run_contents(tmp_path) == []  # a directory with other files holds no run
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "final").mkdir()
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 2)
    found = run_contents(tmp_path)
    assert found == ["metrics.jsonl", "final", "checkpoint-2", "checkpoint-4"]
    clear_run(tmp_path, found, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_trim_metrics_keeps_steps_up_to_the_checkpoint_and_drops_the_closing_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 5, "train_runtime": 3.0}]
    records.insert(3, {"step": 3, "held_out/pass@1": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert trim_metrics(path, 3) == 3
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3},
                    {"step": 3, "held_out/pass@1": 0.5}]
    assert trim_metrics(tmp_path / "none.jsonl", 3) == 0


def test_changed_settings_name_each_key_with_old_and_new():
    before = {"seed": 0, "source": "a.yaml", "trainer": {"learning_rate": 1e-4, "max_steps": 60,
                                                         "resume_from_checkpoint": None}}
    after = {"seed": 0, "source": "b.yaml", "trainer": {"learning_rate": 5e-5, "max_steps": 60, "warmup_steps": 5,
                                                        "resume_from_checkpoint": True}}
    assert changed_settings(before, after) == ["trainer.learning_rate: 0.0001 -> 5e-05",
                                               "trainer.warmup_steps: None -> 5"]
    assert changed_settings(before, before) == []


def test_resumed_step_from_the_name_or_the_trainer_state(tmp_path):
    assert resumed_step(None) is None
    assert resumed_step(str(_checkpoint(tmp_path, 30))) == 30
    other = tmp_path / "saved"
    other.mkdir()
    (other / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    assert resumed_step(str(other)) == 7


def test_sigterm_asks_for_a_save_and_a_stop_at_the_step_end_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    control = types.SimpleNamespace(should_save=False, should_training_stop=False)
    state = types.SimpleNamespace(global_step=7)
    with StopOnSignal() as stopper:
        stopper.on_step_end(None, state, control)
        assert not control.should_save and stopper.stopped_at is None  # no signal yet: nothing changes
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler, which only sets a flag
        stopper.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and stopper.stopped_at == 7
    assert signal.getsignal(signal.SIGTERM) == before


def test_preempted_says_where_the_checkpoint_is_and_how_to_continue():
    message = str(Preempted(12, "runs/x/checkpoint-12"))
    assert "step 12" in message and "runs/x/checkpoint-12" in message and "--resume" in message
