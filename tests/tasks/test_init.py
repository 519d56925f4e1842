"""The embedded default (``tasks/__init__.py``): ``build_default`` from a cached warm start, with disjoint held-out
splits and an evaluation that runs."""

from __future__ import annotations

from llm_entreg.tasks import build_default
from llm_entreg.tasks import warmstart as ws


def _no_training(*args, **kwargs):
    raise AssertionError("the cache should have been used; training ran")


def test_build_default_from_cache(tiny_cache, monkeypatch):
    cache_dir, config, path = tiny_cache
    monkeypatch.setattr(ws, "train_warm_start", _no_training)
    d = build_default(cache_dir=cache_dir, warm_start_config=config, n_preference=16, n_prompts=16)
    assert d.from_cache and d.model_path == str(path)
    assert len(d.preference_train) == 16 and len(d.prompts_train) == 16
    assert len(d.prompts_validation) == len(d.problems("validation")) == 64
    # Held-out splits are disjoint from what the warm start trained on.
    assert not {p.prompt for p in d.problems("train")} & set(d.prompts_validation["prompt"])
    m = d.evaluate(d.load_model(), sampled=False)
    assert 0.0 <= m["accuracy"] <= 1.0
