"""One way to fill the on-disk cache (warm start, reward model): once, under a lock, published atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive cross-process lock on ``lock_path`` (POSIX ``flock``)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock, the atomic rename still holds
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(final: Path, is_valid: Callable[[], bool], build: Callable[[Path], dict], marker: str,
               force: bool = False) -> tuple[Path, bool]:
    """Return ``(final, from_cache)``; if ``final`` is not a valid entry (or ``force``), build it.

    Under a per-key lock (so concurrent processes build once), ``build(tmp)`` writes the entry's files into a fresh
    temporary directory and returns its marker dict; the marker is written last, then the directory is renamed into
    place. An interrupted build leaves only a ``.tmp-*`` directory, removed by the next build; an invalid old entry is
    moved aside and deleted.
    """
    if not force and is_valid():
        return final, True
    parent = final.parent
    with locked(parent / f".{final.name}.lock"):
        if not force and is_valid():  # another process finished it while we waited
            return final, True
        for stale in parent.glob(f".tmp-{final.name}-*"):  # leftovers of interrupted runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            info = build(tmp)
            marker_tmp = tmp / (marker + ".part")
            marker_tmp.write_text(json.dumps(info, indent=2, default=float))
            os.replace(marker_tmp, tmp / marker)  # the marker appears whole or not at all
            if final.exists():  # invalid (partial / stale / forced): move aside, then delete
                trash = parent / f".tmp-{final.name}-old-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, False
