"""SFT warm start: it learns, it is cached, a second call reuses the cache, partial caches are never trusted."""

from __future__ import annotations

import json
import os

import pytest

from llm_entreg.tasks import (
    CACHE_ENV,
    cache_root,
    ensure_warm_start,
    is_valid_warm_start,
    read_marker,
    warm_start,
    warm_start_dir,
)
from llm_entreg.tasks import warmstart as ws


def _no_training(*args, **kwargs):
    raise AssertionError("the cache should have been used; training ran")


def test_warm_start_learns(tiny_cache):
    _, config, path = tiny_cache
    assert is_valid_warm_start(path, config)
    metrics = read_marker(path)["metrics"]
    assert metrics["steps"] == config.max_steps
    assert metrics["final_loss"] < 0.6 * metrics["initial_loss"]
    before, after = metrics["validation_before"], metrics["validation_after"]
    assert after["nll"] < before["nll"] - 1.0
    assert after["ref_entropy"] > 0.05  # far from a collapsed policy
    assert [s for s, _ in metrics["probe_history"]] == [40, 80]


def test_second_call_hits_cache(tiny_cache, monkeypatch):
    cache_dir, config, path = tiny_cache
    created = read_marker(path)["created"]
    monkeypatch.setattr(ws, "train_warm_start", _no_training)
    model, tokenizer, path2, info, from_cache = warm_start(config, cache_dir)
    assert from_cache and path2 == path and info["created"] == created
    assert model.config.vocab_size == len(tokenizer)
    assert not model.training


@pytest.mark.parametrize("damage", ["no_marker", "incomplete_marker", "no_weights", "other_key", "garbage_marker"])
def test_partial_cache_is_not_valid(tiny_cache, tmp_path, damage):
    _, config, path = tiny_cache
    fake_root = tmp_path / "root"
    target = warm_start_dir(config, fake_root)
    target.mkdir(parents=True)
    for name in os.listdir(path):
        (target / name).write_bytes((path / name).read_bytes())
    assert is_valid_warm_start(target, config)
    marker = target / "warmstart.json"
    info = json.loads(marker.read_text())
    if damage == "no_marker":
        marker.unlink()
    elif damage == "incomplete_marker":
        marker.write_text(json.dumps({**info, "complete": False}))
    elif damage == "no_weights":
        (target / "model.safetensors").unlink()
    elif damage == "other_key":
        marker.write_text(json.dumps({**info, "key": "qwen2-add-0000000000000000"}))
    else:
        marker.write_text('{"complete": tr')
    assert not is_valid_warm_start(target, config)


def test_partial_cache_is_retrained(make_tiny_config, tmp_path):
    config = make_tiny_config(max_steps=6, eval_every=6, probe_size=8)
    final = warm_start_dir(config, tmp_path)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # an interrupted writer's leftovers, no marker
    stale_tmp = final.parent / f".tmp-{final.name}-999-deadbeef"
    stale_tmp.mkdir()
    path, from_cache = ensure_warm_start(config, tmp_path)
    assert not from_cache and path == final
    assert is_valid_warm_start(final, config)
    assert not stale_tmp.exists()
    assert sorted(p.name for p in final.parent.iterdir() if p.is_dir()) == [final.name]


def test_interrupted_write_leaves_no_valid_cache(make_tiny_config, tmp_path, monkeypatch):
    config = make_tiny_config(max_steps=6, eval_every=6, probe_size=8)
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt("simulated kill while saving")

    monkeypatch.setattr(ws.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_warm_start(config, tmp_path)
    monkeypatch.setattr(ws.os, "replace", real_replace)
    final = warm_start_dir(config, tmp_path)
    assert not final.exists()
    assert not is_valid_warm_start(final, config)
    assert not [p for p in final.parent.iterdir() if p.is_dir()]  # the temporary directory was removed


def test_cache_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root().name == "llm_entreg"


def test_key_depends_on_config(make_tiny_config):
    a, b = make_tiny_config(), make_tiny_config()
    assert a.key() == b.key()
    assert a.key() != make_tiny_config(seed=1).key()
    assert a.key() != make_tiny_config(lr=1e-3).key()
    assert a.key().startswith("qwen2-add-")
    # the slice-biased warm start is another entry; the field left False keeps the keys of older entries
    assert a.key() != make_tiny_config(wrong_on_slice=True).key()
    assert "wrong_on_slice" not in a.to_dict() and make_tiny_config(wrong_on_slice=True).to_dict()["wrong_on_slice"]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_steps": 0}, "max_steps"), ({"lr": 0.0}, "lr"), ({"target_accuracy": 1.5}, "target_accuracy"),
     ({"batch_size": -1}, "batch_size")],
)
def test_invalid_config(make_tiny_config, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_tiny_config(**kwargs)
