"""Launch helpers (``launch.py``): the shipped accelerate configs found by name from the installed package, and the
accelerate relaunch command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llm_entreg import launch

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = launch.shipped_configs()
    assert set(shipped) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for name, path in shipped.items():
        assert launch.resolve_accelerate_config(name) == path
        assert launch.resolve_accelerate_config(f"{name}.yaml") == path
        assert path.read_text() == (ROOT / "configs" / f"{name}.yaml").read_text()


def test_a_path_is_taken_as_is_and_an_unknown_name_lists_the_known_ones(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("num_processes: 2\n")
    assert launch.resolve_accelerate_config(str(own)) == own
    with pytest.raises(launch.LaunchError, match=r"no config 'no_such_config'.*'cpu_zero2_2proc'"):
        launch.resolve_accelerate_config("no_such_config")


def test_relaunch_runs_llm_entreg_under_accelerate(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 3)
    lines = []
    assert launch.relaunch("/cfg.yaml", ["train", "r.yaml", "x=1"], log=lines.append) == 3
    assert calls == [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", "/cfg.yaml", "-m",
                      "llm_entreg", "train", "r.yaml", "x=1"]]
    assert lines == ["launching: " + " ".join(calls[0])]
