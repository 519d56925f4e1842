"""scripts/device_issue7.sh: the one-call GPU job of issue 7, run at toy sizes on the CPU (ISSUE7_DRY=1).

The GPU machine is lent to some sessions only and its time is scarce: the script must not fail on a typo there.
This runs its stages (minus the slow interpreter ones) and checks that each wrote its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_device_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "ISSUE7_DRY": "1", "ISSUE7_STAGES": "probe main profile sizes",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_issue7.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("probe", "main", "profile", "sizes"):  # profile: CUDA only, says so and exits 0
        assert f"== {name} rc=0" in summary, summary
    report = json.loads(next((tmp_path / "main").glob("bench_*.json")).read_text())
    assert report["config"]["check_sampled"] == 128
    for spec in ("naive", "trl_chunked", "ours_chunked", "ours_fused_loss"):
        res = report["results"][spec]
        assert res["status"] == "ok" and res["check_sampled"]["passed"], (spec, res)
    assert (tmp_path / "sizes" / "sizes.png").is_file() and (tmp_path / "sizes" / "sizes.md").is_file()
    assert "######## summary" in proc.stdout
