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
        assert launch.resolve_accelerate_config(name, gpus=8) == path
        assert launch.resolve_accelerate_config(f"{name}.yaml", gpus=8) == path
        assert path.read_text() == (ROOT / "configs" / f"{name}.yaml").read_text()


def test_a_path_is_taken_as_is_and_an_unknown_name_lists_the_known_ones(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("num_processes: 2\n")
    assert launch.resolve_accelerate_config(str(own)) == own
    with pytest.raises(launch.LaunchError, match=r"no config 'no_such_config'.*'cpu_zero2_2proc'"):
        launch.resolve_accelerate_config("no_such_config")


@pytest.mark.parametrize(("trl_name", "ours", "on_cpus"), [
    ("zero2", "deepspeed_zero2", "cpu_zero2_2proc"), ("zero3", "deepspeed_zero3", "cpu_zero3_2proc"),
    ("multi_gpu", "multi_gpu_ddp", "cpu_ddp_2proc"), ("fsdp2", "fsdp2", "cpu_ddp_2proc"),
])
def test_trls_config_names_resolve_and_a_gpu_config_on_a_cpu_names_the_cpu_one(trl_name, ours, on_cpus):
    assert launch.resolve_accelerate_config(trl_name, gpus=2) == launch.shipped_configs()[ours]
    with pytest.raises(launch.LaunchError, match=rf"needs GPUs and this machine has none; on CPUs use {on_cpus}"):
        launch.resolve_accelerate_config(trl_name, gpus=0)
    assert launch.resolve_accelerate_config(on_cpus, gpus=0).stem == on_cpus


def test_a_multi_process_launch_that_started_one_process_is_refused():
    simple = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(launch.LaunchError, match="asked for several processes but started one"):
        launch.check_single_process_launch(simple)
    launch.check_single_process_launch({**simple, "WORLD_SIZE": "2", "RANK": "0"})  # a real 2-process launch
    launch.check_single_process_launch({"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch of 1 process
    launch.check_single_process_launch({})  # no launcher


class _Recorded:
    def __init__(self, calls, code):
        self.calls, self.code = calls, code

    def __call__(self, cmd, **kwargs):
        self.calls.append((cmd, kwargs))
        self.pid = -1
        return self

    def wait(self):
        return self.code


def test_relaunch_runs_llm_entreg_under_accelerate_in_its_own_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "Popen", _Recorded(calls, 3))
    lines = []
    assert launch.relaunch("/cfg.yaml", ["train", "r.yaml", "x=1"], log=lines.append) == 3
    ((cmd, kwargs),) = calls
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "/cfg.yaml", "-m",
                   "llm_entreg", "train", "r.yaml", "x=1"]
    assert kwargs == {"start_new_session": True}
    assert lines == ["launching: " + " ".join(cmd)]


_CHILD = """
import pathlib, signal, sys, time
here = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    (here / "got_sigterm").write_text("yes")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
(here / "ready").write_text("yes")
while True:
    time.sleep(0.05)
"""


def test_a_sigterm_to_the_launcher_reaches_the_ranks_once_and_exits_143(monkeypatch, tmp_path):
    import os
    import signal
    import threading
    import time

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    monkeypatch.setattr(launch, "accelerate_command", lambda config, args: [sys.executable, str(script), str(tmp_path)])

    def scheduler():
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=scheduler, daemon=True).start()
    assert launch.relaunch("cfg", [], log=lambda *a: None) == launch.PREEMPTED_EXIT
    assert (tmp_path / "got_sigterm").read_text() == "yes"
    assert signal.getsignal(signal.SIGTERM) == before
