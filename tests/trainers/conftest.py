"""Fixtures of the trainer tests."""

from __future__ import annotations

import pytest

from llm_entreg.tasks import build_default


@pytest.fixture(scope="module")
def default():
    """The embedded default (warm-started tiny model, cached), shared by a module's tests."""
    return build_default(seed=0)
