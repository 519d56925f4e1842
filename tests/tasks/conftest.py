"""Shared fixtures for the embedded-default tests: one tiny warm start per session, in a temporary cache."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.tasks import TaskSpec, WarmStartConfig, build_tokenizer


def tiny_warm_start_config(**overrides) -> WarmStartConfig:
    """A warm start small enough for a unit test (a few seconds on one CPU thread)."""
    kwargs = dict(
        task=TaskSpec(task="add", max_operand=30, n_validation=64, n_test=64),
        seed=0,
        hidden_size=32,
        layers=1,
        heads=2,
        max_steps=80,
        batch_size=32,
        lr=3e-3,
        warmup_steps=10,
        target_accuracy=None,
        eval_every=40,
        probe_size=32,
    )
    kwargs.update(overrides)
    return WarmStartConfig(**kwargs)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and many times faster on a busy machine (measured:
    an evaluation took 2-7 s with 2 threads under load, 0.07 s with 1). Restored after each module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def make_tiny_config():
    """The factory above, for tests that need a variant of the tiny warm start."""
    return tiny_warm_start_config


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache root holding one trained tiny warm start: ``(cache_dir, config, path)``."""
    from llm_entreg.tasks import ensure_warm_start

    cache_dir = tmp_path_factory.mktemp("entreg_cache")
    config = tiny_warm_start_config()
    path, from_cache = ensure_warm_start(config, cache_dir)
    assert not from_cache
    return cache_dir, config, path
