"""What a sweep keeps on disk: one ``trial.json`` per trial, and the sweep's ``results.csv`` / ``results.md`` /
``best.json``.

``trial.json`` (written atomically) holds the trial's id, axis values, overrides, a fingerprint of its resolved
recipe, ``status`` (``running`` / ``complete`` / ``failed``), timings, the results row and, for a failure,
``error`` (``Type: message``; the traceback is in ``traceback.txt`` beside it). A trial is *finished* when its
``trial.json`` parses, says ``complete`` and has the same fingerprint as the trial about to run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

TRIAL_FILE = "trial.json"
TRACEBACK_FILE = "traceback.txt"
METRICS_FILE = "metrics.jsonl"

COLUMNS = (
    "id", "entropy_coef", "schedule", "seed", "status", "val_reward", "reward_source", "reward_before", "val_nll",
    "val_accuracy", "val_sampled_accuracy", "val_entropy", "val_ref_entropy", "entropy_first", "entropy_last",
    "entropy_ratio", "collapsed", "never_committed", "coef_last", "steps", "seconds", "resumed_from", "error",
    "output_dir",
)
MD_COLUMNS = (
    ("id", "trial"), ("status", "status"), ("val_reward", "val reward"), ("reward_before", "reward before"),
    ("val_nll", "val NLL"), ("val_entropy", "val entropy"), ("entropy_first", "train H first 20%"),
    ("entropy_last", "train H last 20%"), ("collapsed", "collapsed"), ("never_committed", "never committed"),
    ("seconds", "s"),
)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default))
    os.replace(tmp, path)


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_trial(trial_dir: str | os.PathLike) -> dict | None:
    """The trial's record, or ``None`` if there is none or it does not parse."""
    path = Path(trial_dir) / TRIAL_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "id" in record and "status" in record else None


def write_trial(trial_dir: str | os.PathLike, record: dict) -> None:
    write_json(Path(trial_dir) / TRIAL_FILE, record)


def is_finished(record: dict | None, fingerprint: str | None = None) -> bool:
    return bool(record and record.get("status") == "complete" and isinstance(record.get("row"), dict)
                and (fingerprint is None or record.get("fingerprint") == fingerprint))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Logged records of ``metrics.jsonl``; a resumed run's re-logged steps replace the interrupted run's.

    A resumed trainer logs again from its checkpoint's step, so when a record's step goes back, the records
    logged at or after that step before the interruption are dropped. Unparseable lines are skipped.
    """
    records: list[dict] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if isinstance(step, int) and records and isinstance(records[-1].get("step"), int) and step < records[-1]["step"]:
            records = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] >= step)]
        records.append(record)
    return records


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def write_results_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    columns = list(COLUMNS) + extra
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    os.replace(tmp, path)
    return path


def read_results_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _md(value, key: str) -> str:
    if key == "error" and value:
        return str(value).replace("|", "\\|").replace("\n", " ")[:120]
    if isinstance(value, float) and key == "seconds":
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "**yes**" if value else "no"
    return str(value).replace("|", "\\|")


def results_markdown(rows: list[dict], best: dict | None, title: str = "β sweep", notes: list[str] = ()) -> str:
    lines = [f"# {title}", ""]
    if best:
        from .grid import format_coef

        lines += [f"**Pick:** β = {format_coef(best['entropy_coef'])}, schedule `{best['schedule']}` — "
                  f"validation reward {best['val_reward']:.4g}"
                  + (f", NLL {best['val_nll']:.4g}" if best.get("val_nll") is not None else "")
                  + f" ({best['reason']}; seeds {best['seeds']}).", "", f"Rule: {best['rule']}", ""]
    else:
        lines += ["**Pick:** none (no trial finished with a validation reward).", ""]
    lines += ["| " + " | ".join(label for _, label in MD_COLUMNS) + " | error |",
              "|" + "---|" * (len(MD_COLUMNS) + 1)]
    for row in rows:
        cells = [_md(row.get(key), key) for key, _ in MD_COLUMNS] + [_md(row.get("error"), "error")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def write_results_md(rows: list[dict], best: dict | None, path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    path.write_text(results_markdown(rows, best, **kwargs))
    return path
