"""scripts/gpu/benchmark_suite.sh: the one-call GPU benchmark suite, run at toy sizes on the CPU (GPU_SUITE_DRY=1).

The GPU machine is lent to some runs only and its time is scarce: the script must not fail on a typo there. This
runs its stages (minus the slow interpreter ones) and checks that each wrote its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_benchmark_suite_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SUITE_DRY": "1", "GPU_SUITE_STAGES": "ceilings main profile sizes",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "benchmark_suite.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("ceilings", "main", "profile", "sizes"):  # ceilings, profile: CUDA only, say so and exit 0
        assert f"== {name} rc=0" in summary, summary
    assert "no CUDA device" in (tmp_path / "ceilings.log").read_text()
    report = json.loads(next((tmp_path / "main").glob("bench_*.json")).read_text())
    assert report["config"]["check_sampled"] == 128
    for spec in ("naive", "trl_chunked", "ours_chunked", "ours_fused_loss"):
        res = report["results"][spec]
        assert res["status"] == "ok" and res["check_sampled"]["passed"], (spec, res)
    assert (tmp_path / "sizes" / "sizes.png").is_file() and (tmp_path / "sizes" / "sizes.md").is_file()
    assert "######## summary" in proc.stdout
