"""SIGTERM under ``llm-entreg train --accelerate-config cpu_ddp_2proc`` (2 CPU ranks): sent to the whole job, as a
scheduler does, every rank finishes its step, one complete checkpoint is saved, the command exits with 143 and no
traceback of ours; the run then resumes from that checkpoint on 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from distributed_helpers import LAUNCH_TIMEOUT, RECIPES, ROOT, child_env, config_copy

from llm_entreg.checkpoints import COMPLETE_MARKER
from llm_entreg.launch import PREEMPTED_EXIT

pytestmark = pytest.mark.slow


def _logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_sigterm_to_a_two_process_run_saves_a_complete_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    config = config_copy("cpu_ddp_2proc", tmp_path / "_configs")
    args = [str(RECIPES / "dpo_entropy.yaml"), f"output_dir={out}", "logging_steps=1", "save_strategy=no",
            "evaluation.held_out=false", "entropy_schedule=linear"]
    cmd = [sys.executable, "-m", "llm_entreg", "train", *args, "max_steps=100000", "--accelerate-config", str(config)]
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + LAUNCH_TIMEOUT
        while not _logged_steps(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # polling for the first logged step, not a fix for a race
        assert proc.poll() is None, log.read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=LAUNCH_TIMEOUT)
    text = log.read_text()
    assert code == PREEMPTED_EXIT, text[-4000:]
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert (checkpoint / COMPLETE_MARKER).is_file()
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}  # both ranks saved
    assert f"stopped by SIGTERM at step {step}" in text and "--resume" in text
    assert _logged_steps(out)[-1] == step and not (out / "final").exists()

    resumed = subprocess.run([sys.executable, "-m", "llm_entreg", "train", *args, f"max_steps={step + 2}",
                              "--resume", "--accelerate-config", str(config)],
                             cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert _logged_steps(out) == list(range(1, step + 3))
    assert "trainer.max_steps: 100000 -> " in resumed.stdout + resumed.stderr
