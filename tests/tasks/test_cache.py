"""The on-disk cache filler (``tasks/cache.py``): built once, published atomically, an interrupted build leaves no
valid entry, a forced build replaces the old one, and concurrent callers build once."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from llm_entreg.tasks.cache import build_once


def _valid(final):
    return lambda: (final / "marker.json").is_file() and (final / "payload.txt").is_file()


def _builder(text, calls):
    def build(tmp):
        calls.append(text)
        tmp.mkdir(parents=True)
        (tmp / "payload.txt").write_text(text)
        return {"text": text}

    return build


def test_built_once_then_read_from_the_cache(tmp_path):
    final, calls = tmp_path / "entry", []
    assert build_once(final, _valid(final), _builder("a", calls), "marker.json") == (final, False)
    assert build_once(final, _valid(final), _builder("b", calls), "marker.json") == (final, True)
    assert calls == ["a"] and (final / "payload.txt").read_text() == "a"
    assert json.loads((final / "marker.json").read_text()) == {"text": "a"}
    build_once(final, _valid(final), _builder("c", calls), "marker.json", force=True)
    assert (final / "payload.txt").read_text() == "c" and calls == ["a", "c"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_interrupted_build_leaves_no_valid_entry_and_is_cleaned_up(tmp_path):
    final = tmp_path / "entry"

    def crash(tmp):
        tmp.mkdir(parents=True)
        (tmp / "payload.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(final, _valid(final), crash, "marker.json")
    assert not final.exists() and not list(tmp_path.glob(".tmp-*"))
    build_once(final, _valid(final), _builder("ok", []), "marker.json")
    assert _valid(final)()


def _slow_build(final, log):
    def build(tmp):
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.3)  # long enough that the second process arrives while the first holds the lock
        tmp.mkdir(parents=True)
        (tmp / "payload.txt").write_text("x")
        return {}

    build_once(final, _valid(final), build, "marker.json")


def test_concurrent_callers_build_once(tmp_path):
    final, log = tmp_path / "entry", tmp_path / "log.txt"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_slow_build, args=(final, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert log.read_text() == "built\n" and _valid(final)()
