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
    "val_accuracy", "val_sampled_accuracy", "val_pass@1", "val_pass@4", "val_pass@16", "val_distinct_correct",
    "val_entropy_before", "val_entropy", "val_ref_entropy", "entropy_first", "entropy_last", "entropy_ratio",
    "collapsed", "never_committed", "collapsed_held_out", "never_committed_held_out", "coef_last", "steps", "seconds",
    "resumed_from", "error", "output_dir",
)
MD_COLUMNS = (
    ("id", "trial"), ("status", "status"), ("val_reward", "val reward"), ("reward_before", "reward before"),
    ("val_nll", "val NLL"), ("val_pass@1", "pass@1"), ("val_pass@16", "pass@16"),
    ("val_distinct_correct", "distinct correct"), ("val_entropy", "val entropy"), ("entropy_first", "train H first 20%"),
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


def _interval(entry: dict | None) -> str:
    if not entry:
        return "–"
    lo, hi = entry["ci95"]
    return f"{entry['mean']:.4g} [{lo:.4g}, {hi:.4g}]"


def _config_lines(configs: list[dict], metric: str) -> list[str]:
    lines = [f"## Configurations ({metric}: mean over seeds [95% interval])", "",
             "| β | schedule | seeds | " + metric + " | vs β = 0 | beyond noise | held-out entropy | pass@1 | pass@16 | "
             "distinct correct | collapsed (train / held-out) | never committed (train / held-out) |",
             "|" + "---|" * 12]
    from .grid import format_coef

    for c in configs:
        n = len(c["seeds"])
        diff = _interval(c.get("paired_diff")) if c.get("paired_diff") else ("baseline" if c["entropy_coef"] == 0
                                                                               else "–")
        beyond = "–" if c.get("significant") is None else ("**yes**" if c["significant"] else "no")
        lines.append(f"| {format_coef(c['entropy_coef'])} | {c['schedule']} | {n} | {_interval(c)} | {diff} | "
                     f"{beyond} | {_md(c.get('val_entropy'), '')} | {_md(c.get('val_pass@1'), '')} | "
                     f"{_md(c.get('val_pass@16'), '')} | {_md(c.get('val_distinct_correct'), '')} | "
                     f"{c['n_collapsed']}/{n} / {c['n_collapsed_held_out']}/{n} | "
                     f"{c['n_never_committed']}/{n} / {c['n_never_committed_held_out']}/{n} |")
    return lines + [""]


def results_markdown(rows: list[dict], best: dict | None, title: str = "β sweep", notes: list[str] = (),
                     configs: list[dict] = ()) -> str:
    lines = [f"# {title}", ""]
    if best:
        from .grid import format_coef

        verdict = "beyond noise" if best["significant"] else "no configuration beat β = 0 beyond noise"
        base = f"; β = 0: {_interval(best['baseline'])}" if best.get("baseline") else ""
        lines += [f"**Pick ({best['metric']}):** β = {format_coef(best['entropy_coef'])}, schedule "
                  f"`{best['schedule']}` — {_interval(best)} over seeds {best['seeds']}{base}. **{verdict}.** "
                  f"{best['reason']}.", "", f"Rule: {best['rule']}", ""]
        lines += _config_lines(list(configs), best["metric"])
    else:
        lines += ["**Pick:** none (no trial finished with the pick metric).", ""]
    lines += ["## Trials", "", "| " + " | ".join(label for _, label in MD_COLUMNS) + " | error |",
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
