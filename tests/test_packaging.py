"""The wheel holds the whole package: every module of the source tree, and the recipes and accelerate configs as
package data (``llm_entreg.recipe_files``, ``llm_entreg.configs``), so a regular install finds them by name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_module_recipe_and_config(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    for name in ("llm_entreg", "configs", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("llm_entreg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "llm_entreg").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (add their package to pyproject.toml)"
    for folder, package in (("recipes", "recipe_files"), ("configs", "configs")):
        shipped = {f"llm_entreg/{package}/{p.name}" for p in (ROOT / folder).glob("*.yaml")}
        assert shipped and shipped <= names, f"{folder}/ missing from the wheel"
