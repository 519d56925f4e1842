"""Helpers for the sweep tests: a sweep config over the shipped DPO recipe and a counting fake trial function."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_entreg.sweep.fake import fake_run
from llm_entreg.sweep.spec import build_config

ROOT = Path(__file__).resolve().parents[2]
DPO = ROOT / "recipes" / "dpo_entropy.yaml"


class CountingTrial:
    """A fast fake trial function that records its calls; ``fail_on`` β values raise ``RuntimeError``."""

    def __init__(self, fail_on=()):
        self.calls: list[tuple[float, str | None]] = []
        self.fail_on = set(fail_on)

    def __call__(self, recipe, resume_from_checkpoint=None, log=print):
        coef = recipe["trainer"]["entropy_coef"]
        self.calls.append((coef, resume_from_checkpoint))
        if coef in self.fail_on:
            raise RuntimeError(f"boom at beta={coef}")
        return fake_run(recipe, resume_from_checkpoint=resume_from_checkpoint, log=log)


@pytest.fixture
def make_config(tmp_path):
    def make(coefs="0,1e-3,1e-2,1e-1", out=None, overrides=("max_steps=10", "logging_steps=1"), **kwargs):
        kwargs.setdefault("progress", False)
        kwargs.setdefault("seeds", "0")  # the machinery tests use one seed; the pick tests give three
        kwargs.setdefault("plots", False)  # test_report_files_and_plots and the end-to-end test draw them
        return build_config(str(DPO), list(overrides), entropy_coef=coefs, out=str(out or tmp_path / "sweep"), **kwargs)

    return make
