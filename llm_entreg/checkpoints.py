"""Checkpoints a run can trust: a completion marker written last (with every file's size), the newest complete
checkpoint to resume from, file checks that name the broken file, and rotation that only counts complete ones."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

#: Written into a checkpoint directory after everything else; a checkpoint without it is incomplete.
COMPLETE_MARKER = "llm_entreg_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the directory or file and what to do."""


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories of ``output_dir``, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, key=lambda item: -item[0])]


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def clear_marker(folder: str | os.PathLike) -> None:
    """Remove the marker before a checkpoint directory is (re)written, so a half-rewritten one never looks complete."""
    marker = Path(folder) / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()


def write_marker(folder: str | os.PathLike, step: int) -> None:
    """Mark ``folder`` complete: the sizes of all its files, written to a temporary name and renamed."""
    root = Path(folder)
    tmp = root / (COMPLETE_MARKER + ".tmp")  # a leftover of an earlier crash is overwritten, never listed
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in (COMPLETE_MARKER, tmp.name)}
    tmp.write_text(json.dumps({"step": step, "files": sizes}, indent=1))
    os.replace(tmp, root / COMPLETE_MARKER)


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def _check_file(path: Path) -> str | None:
    """Why ``path`` cannot be read back (None if it can): safetensors headers, torch zip archives, JSON."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        elif path.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its checksum"
        elif path.suffix in (".pt", ".pth", ".bin"):
            return "not a torch archive (truncated or overwritten)"
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file that is missing, has changed size since the checkpoint was
    marked complete, or cannot be read back."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    marker = root / COMPLETE_MARKER
    recorded = json.loads(marker.read_text()).get("files", {}) if marker.is_file() else {}
    advice = ("; delete this checkpoint to resume from the one before it, or name another with "
              "--resume=PATH (resume_from_checkpoint=PATH)")
    for name, size in recorded.items():
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint recorded it){advice}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the checkpoint recorded {size}: truncated or "
                                  f"changed after it was written{advice}")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        problem = _check_file(path)
        if problem:
            raise CheckpointError(f"{path}: unreadable ({problem}){advice}")


def newest_complete(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``output_dir`` and the newer ones skipped, each with the reason."""
    skipped = []
    for folder in checkpoint_dirs(output_dir):
        if is_complete(folder):
            return folder, skipped
        skipped.append((folder, f"no {COMPLETE_MARKER}: it was still being written when the run stopped"))
    return None, skipped


def rotate(output_dir: str | os.PathLike, limit: int | None, keep: str | os.PathLike | None = None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints (and ``keep``, the best one); delete older complete ones and
    incomplete ones older than the newest complete one. Returns what was deleted."""
    if not limit or limit <= 0:
        return []
    keep = Path(keep).resolve() if keep else None
    complete_seen, deleted = 0, []
    for folder in checkpoint_dirs(output_dir):
        complete = is_complete(folder)
        if complete:
            complete_seen += 1
        if folder.resolve() == keep or (complete and complete_seen <= limit) or (not complete and not complete_seen):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def load_state_file(path: str, what: str) -> dict:
    """A state file of tensors and plain types, loaded with ``weights_only=True``: a file that needs anything else
    (a pickled object, code) is refused, naming the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "allowed global" not in str(exc):
            raise ValueError(f"{path}: corrupt {what} (not a readable torch file)") from exc
        raise ValueError(f"{path}: refused: the {what} holds more than tensors and plain values (a pickled object "
                         f"that loading would run); only load checkpoints you trust with code") from exc
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: corrupt {what} ({exc.__class__.__name__}: {exc})") from exc
