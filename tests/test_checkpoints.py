"""Checkpoint completeness, verification, resume choice and rotation, on hand-made checkpoint directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llm_entreg.checkpoints import (
    COMPLETE_MARKER, CheckpointError, checkpoint_dirs, clear_marker, is_complete, load_state_file, newest_complete,
    rotate, verify_checkpoint, write_marker,
)


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.ones(8)}}, "param_groups": []}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        write_marker(folder, step)
    return folder


def test_the_newest_complete_checkpoint_wins_and_newer_incomplete_ones_are_named(tmp_path):
    _checkpoint(tmp_path, 50)
    good = _checkpoint(tmp_path, 100)
    partial = _checkpoint(tmp_path, 150, complete=False)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-150", "checkpoint-100", "checkpoint-50"]
    chosen, skipped = newest_complete(tmp_path)
    assert chosen == good
    assert [(p, "still being written" in why) for p, why in skipped] == [(partial, True)]
    assert newest_complete(tmp_path / "missing") == (None, [])


def test_a_marker_is_cleared_before_a_rewrite_and_lists_every_file(tmp_path):
    folder = _checkpoint(tmp_path, 10)
    recorded = json.loads((folder / COMPLETE_MARKER).read_text())
    assert recorded["step"] == 10
    assert set(recorded["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.json"}
    clear_marker(folder)
    assert not is_complete(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_truncated_file_is_named_with_what_to_do(tmp_path, name):
    folder = _checkpoint(tmp_path, 10)
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: {len(data) // 2} bytes, the checkpoint recorded "
                                              rf"{len(data)}: truncated .*delete this checkpoint"):
        verify_checkpoint(folder)


@pytest.mark.parametrize(("name", "damage"), [
    ("model.safetensors", lambda data: b"\xff" * 8 + data[8:]),  # the header length
    ("model.safetensors", lambda data: data[: len(data) - 16]),  # truncated: the header promises more
    ("optimizer.pt", lambda data: data[: len(data) // 2] + b"\x00" * (len(data) - len(data) // 2)),  # CRC
    ("optimizer.pt", lambda data: data[: len(data) // 2]),  # no zip directory
])
def test_a_damaged_file_without_a_marker_is_still_caught(tmp_path, name, damage):
    folder = _checkpoint(tmp_path, 10, complete=False)  # e.g. a checkpoint written by plain TRL
    verify_checkpoint(folder)
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"{name}: unreadable"):
        verify_checkpoint(folder)


def test_rotation_keeps_the_newest_complete_ones_and_never_an_incomplete_newest(tmp_path):
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)  # an old leftover
    newest = _checkpoint(tmp_path, 40, complete=False)  # being written now
    deleted = rotate(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-5"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-40", "checkpoint-30", "checkpoint-20"]
    assert newest.exists()
    assert rotate(tmp_path, 1, keep=tmp_path / "checkpoint-20") == []  # the best one is kept
    assert rotate(tmp_path, None) == []


class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_state_files_load_as_data_only(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"version": 1, "coefficient": {"kind": "linear", "step": 3, "value": 0.5}, "t": torch.ones(2)}, plain)
    assert load_state_file(str(plain), "state")["coefficient"]["step"] == 3
    witness = tmp_path / "ran"
    torch.save({"coefficient": _Payload(witness)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refused: the state holds more than tensors"):
        load_state_file(str(tmp_path / "evil.pt"), "state")
    assert not witness.exists()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt: corrupt state"):
        load_state_file(str(tmp_path / "junk.pt"), "state")


def test_a_marker_left_half_written_by_a_crash_is_not_listed_as_a_file(tmp_path):
    folder = _checkpoint(tmp_path, 10, complete=False)
    (folder / (COMPLETE_MARKER + ".tmp")).write_text("{")  # a crash between writing the marker and renaming it
    write_marker(folder, 10)
    verify_checkpoint(folder)  # would name the .tmp file as missing had it been listed
    assert not (folder / (COMPLETE_MARKER + ".tmp")).exists()
