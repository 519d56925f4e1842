"""scripts/: each entry point runs as a plain script of the installed package (no path tricks), and refuses bad
input before it would spend GPU time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_bench_head_help_runs():
    proc = _run(SCRIPTS / "bench_head.py", "--help", timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--impls" in proc.stdout


@pytest.mark.parametrize("script, option", [("bench_step.py", "--tiny"), ("bench_sizes.py", "--vocabs")])
def test_other_bench_scripts_help_runs(script, option):
    proc = _run(SCRIPTS / script, "--help")
    assert proc.returncode == 0 and option in proc.stdout, proc.stderr[-2000:]


def test_profile_head_refuses_a_typo_before_looking_for_a_gpu():
    proc = _run(SCRIPTS / "gpu" / "profile_head.py", "--impls", "trl_chunkd")
    assert proc.returncode != 0 and "'trl_chunkd'" in proc.stderr


def test_scripts_import_the_package_as_installed():
    for path in SCRIPTS.rglob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text and "sys.path.append" not in text, path
