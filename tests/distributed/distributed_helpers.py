"""Helpers for the multi-process tests (imported by the test modules of this folder): launch a recipe through
``accelerate launch`` (2 CPU ranks, gloo) or as one plain process, and read back what it logged (``metrics.jsonl``), what every rank saw (``probe/rank<R>.jsonl``,
written by ``_probe_train.py``) and the final weights.

Every launch gets a private copy of its accelerate config with a free ``main_process_port``, so these tests do not
collide with other 2-process runs on the same machine.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RECIPES = ROOT / "recipes"
PROBE = Path(__file__).resolve().with_name("_probe_train.py")
LAUNCH_TIMEOUT = 420  # seconds; a DeepSpeed launch on a fresh machine first JIT-compiles its CPU comm op (~2 min)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_copy(name: str, where: Path) -> Path:
    """``configs/<name>.yaml`` with a free port, written under ``where``."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["main_process_port"] = free_port()
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.port{config['main_process_port']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on a 2-core machine: one thread each
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


class Run:
    """One finished launch: its output directory and its console output."""

    def __init__(self, out: Path, log: str, seconds: float):
        self.out, self.log, self.seconds = Path(out), log, seconds

    def metrics(self) -> list[dict]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    def probe(self) -> dict[int, list[dict]]:
        ranks = {}
        for path in sorted((self.out / "probe").glob("rank*.jsonl")):
            ranks[int(path.stem[4:])] = [json.loads(x) for x in path.read_text().splitlines()]
        return ranks

    def weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.out / "final" / "model.safetensors"))

    def start_weights(self) -> dict:
        """The weights every run starts from (the embedded default's cached warm start, named in the log)."""
        from safetensors.torch import load_file

        match = re.search(r"warm-started tiny model \([^)]*\) at (\S+)", self.log)
        assert match, "no warm-start path in the log"
        return load_file(str(Path(match.group(1)) / "model.safetensors"))


def launch(recipe: str, out: Path, overrides: list[str], *, config: str | None = None, cli: bool = False,
           extra: list[str] = ()) -> Run:
    """Train ``recipes/<recipe>`` into ``out``.

    ``config=None``: one plain process running ``_probe_train.py``. ``config=NAME``: ``accelerate launch
    --config_file <copy of configs/NAME.yaml>`` of ``_probe_train.py`` (every rank writes its probe file), or, with
    ``cli=True``, the real ``llm-entreg train ... --accelerate-config <copy>`` path (no probe).
    """
    out = Path(out)
    args = [str(RECIPES / recipe), f"output_dir={out}", *overrides, *extra]
    if config is None:
        cmd = [sys.executable, str(PROBE), *args]
    elif cli:
        cmd = [sys.executable, "-m", "llm_entreg", "train", *args,
               "--accelerate-config", str(config_copy(config, out.parent / "_configs"))]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(config_copy(config, out.parent / "_configs")), str(PROBE), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"launch failed (rc {proc.returncode}): {' '.join(cmd)}\n--- last output ---\n{log[-6000:]}")
    return Run(out, log, time.time() - t0)


def assert_same_metrics(got: list[dict], want: list[dict], keys, rel=1e-4, abs_=1e-5):
    """Per logged step, the values of ``keys`` agree to float tolerance (a failure names the step and key).

    A key may be absent at a step (e.g. rollout metrics at a PPO epoch that reuses its rollout), but then from both.
    """
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert all(any(k in w for w in want) for k in keys), [k for k in keys if not any(k in w for w in want)]
    for g, w in zip(got, want, strict=True):
        for key in keys:
            assert (key in g) == (key in w), f"step {g['step']} {key}: logged by only one run"
            if key not in w:
                continue
            assert g[key] == pytest.approx(w[key], rel=rel, abs=abs_), f"step {g['step']} {key}: {g[key]} vs {w[key]}"


def assert_ranks_agree(probe: dict[int, list[dict]], world_size: int = 2, distributed_type: str | None = None):
    """Both ranks ran in one world of ``world_size`` processes and saw the identical coefficient trajectory."""
    assert sorted(probe) == list(range(world_size)), f"probe files from ranks {sorted(probe)}"
    for rank, records in probe.items():
        assert records, f"rank {rank} wrote nothing"
        for r in records:
            assert r["world_size"] == world_size and r["num_processes"] == world_size, r
            if distributed_type:
                assert r["distributed_type"] == f"DistributedType.{distributed_type}", r
    strip = [[{k: v for k, v in r.items() if k not in ("rank", "pid", "local_tokens")} for r in probe[rank]] for rank in sorted(probe)]
    for rank, records in enumerate(strip[1:], start=1):
        assert records == strip[0], f"rank {rank} saw another coefficient trajectory than rank 0"
    assert len({r["pid"] for rank in probe for r in probe[rank][:1]}) == world_size  # distinct processes


def coefficient_trajectory(probe_records: list[dict]) -> list[float]:
    return [r["coef_used"] for r in probe_records if r["event"] == "step"]


def measured_entropy(probe_records: list[dict]) -> list[float]:
    """Per step, the entropy the controller was fed (global token mean over ranks and accumulation steps)."""
    by_step = {r["step"]: r["coef_state"]["last_entropy"] for r in probe_records if r["event"] == "log"}
    return [by_step[k] for k in sorted(by_step)]


def assert_same_update(run: Run, reference: Run, rel: float = 1e-4):
    """The parameter change of ``run`` equals that of ``reference`` (same start), to ``rel`` of its norm."""
    import torch

    start, a, b = reference.start_weights(), run.weights(), reference.weights()
    assert a.keys() == b.keys() == start.keys()
    da = torch.cat([(a[k].double() - start[k].double()).flatten() for k in sorted(start)])
    db = torch.cat([(b[k].double() - start[k].double()).flatten() for k in sorted(start)])
    assert db.norm() > 0, "the reference did not move"
    err = ((da - db).norm() / db.norm()).item()
    assert err < rel, f"parameter updates differ: relative error {err:.3g}"
