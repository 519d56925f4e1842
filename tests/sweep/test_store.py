"""What a sweep keeps on disk: trial.json (round trip, unreadable records, finished = complete + same
fingerprint), the resume-aware metrics.jsonl reader, results.csv / results.md, atomic JSON writes."""

from __future__ import annotations

import json
import math

from llm_entreg.sweep.store import (COLUMNS, TRIAL_FILE, is_finished, read_metrics, read_results_csv, read_trial,
                                    results_markdown, write_json, write_results_csv, write_results_md, write_trial)


def test_trial_json_round_trip(tmp_path):
    record = {"id": "coef=1e-2_sched=constant_seed=0", "status": "complete", "fingerprint": "abc",
              "params": {"entropy_coef": 0.01, "schedule": "constant", "seed": 0}, "row": {"val_reward": 0.5}}
    write_trial(tmp_path / "t", record)
    assert read_trial(tmp_path / "t") == record
    assert [p.name for p in (tmp_path / "t").iterdir()] == [TRIAL_FILE]  # no temporary file left behind
    assert read_trial(tmp_path / "missing") is None
    (tmp_path / "t" / TRIAL_FILE).write_text('{"id": "x", "status": "comp')  # torn write: not a record
    assert read_trial(tmp_path / "t") is None
    (tmp_path / "t" / TRIAL_FILE).write_text('{"status": "complete"}')  # no id: not a record
    assert read_trial(tmp_path / "t") is None
    (tmp_path / "t" / TRIAL_FILE).write_text("[1, 2]")
    assert read_trial(tmp_path / "t") is None


def test_is_finished_needs_complete_a_row_and_the_same_fingerprint():
    record = {"id": "t", "status": "complete", "fingerprint": "abc", "row": {"status": "complete"}}
    assert is_finished(record) and is_finished(record, "abc")
    assert not is_finished(record, "abd")  # other settings: not this trial's result
    assert not is_finished({**record, "status": "running"}, "abc")
    assert not is_finished({**record, "status": "failed"})
    assert not is_finished({**record, "row": None}, "abc")
    assert not is_finished(None) and not is_finished({}, "abc")


def test_write_json_is_atomic_and_handles_numpy_values(tmp_path):
    import numpy as np

    write_json(tmp_path / "a" / "b.json", {"x": np.float32(0.5), "n": np.int64(3), "p": tmp_path})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 0.5, "n": 3, "p": str(tmp_path)}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "entropy": 1 / s}) + "\n" for s in (1, 2, 3))
                    + '[1]\n{"step": 4, "entropy": 0.2')  # a killed writer leaves half a line
    assert read_metrics(path) == [{"step": 1, "entropy": 1.0}, {"step": 2, "entropy": 0.5},
                                  {"step": 3, "entropy": 1 / 3}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    with path.open("a") as f:  # the resumed run logs again after its checkpoint-1
        f.write('\n{"step": 2, "entropy": 0.4}\n{"step": 3, "entropy": 0.3}\n{"step": 4, "entropy": 0.25}\n')
    assert read_metrics(path) == [{"step": 1, "entropy": 1.0}, {"step": 2, "entropy": 0.4},
                                  {"step": 3, "entropy": 0.3}, {"step": 4, "entropy": 0.25}]


def test_read_metrics_drops_records_replayed_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "entropy": s} for s in (1, 2, 3, 4)] + [{"step": s, "entropy": 10 * s} for s in (3, 4, 5)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")
    assert [(r["step"], r["entropy"]) for r in read_metrics(path)] == [(1, 1), (2, 2), (3, 30), (4, 40), (5, 50)]


ROWS = [
    {"id": "coef=0_sched=constant_seed=0", "entropy_coef": 0.0, "schedule": "constant", "seed": 0,
     "status": "complete", "val_reward": 0.4375, "val_nll": 0.46612345, "collapsed": True, "never_committed": False,
     "seconds": 12.7, "error": None, "output_dir": "trials/coef=0_sched=constant_seed=0", "custom": "x"},
    {"id": "coef=1e-2_sched=constant_seed=0", "entropy_coef": 0.01, "schedule": "constant", "seed": 0,
     "status": "failed", "val_reward": math.nan, "error": "RuntimeError: a | b\nc", "collapsed": None},
]


def test_results_csv(tmp_path):
    path = write_results_csv(ROWS, tmp_path / "results.csv")
    rows = read_results_csv(path)
    assert list(rows[0]) == [*COLUMNS, "custom"]  # the fixed columns first, then any extra, sorted
    assert rows[0]["val_nll"] == "0.466123" and rows[0]["collapsed"] == "true" and rows[0]["never_committed"] == "false"
    assert rows[0]["entropy_coef"] == "0" and rows[0]["seconds"] == "12.7" and rows[0]["custom"] == "x"
    assert rows[1]["val_reward"] == "" and rows[1]["collapsed"] == "" and rows[1]["custom"] == ""  # nan, None
    assert rows[1]["error"] == "RuntimeError: a | b\nc"  # csv quoting keeps it whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_results_markdown(tmp_path):
    best = {"entropy_coef": 0.0, "schedule": "constant", "metric": "reward", "mean": 0.4375, "ci95": [0.40, 0.47],
            "significant": False, "baseline": {"mean": 0.4375, "ci95": [0.40, 0.47]}, "reason": "best",
            "seeds": [0], "rule": "the rule"}
    configs = [{"entropy_coef": 0.0, "schedule": "constant", "mean": 0.4375, "ci95": [0.40, 0.47], "paired_diff": None,
                "significant": None, "seeds": [0], "val_entropy": 0.5, "val_pass@1": 0.4, "val_pass@16": 0.9,
                "val_distinct_correct": 3.0, "n_collapsed": 1, "n_never_committed": 0, "n_collapsed_held_out": 0,
                "n_never_committed_held_out": 0}]
    text = results_markdown(ROWS, best, title="β sweep: x", notes=["note one"], configs=configs)
    lines = text.splitlines()
    assert lines[0] == "# β sweep: x"
    assert lines[2] == ("**Pick (reward):** β = 0, schedule `constant` — 0.4375 [0.4, 0.47] over seeds [0]; β = 0: "
                        "0.4375 [0.4, 0.47]. **no configuration beat β = 0 beyond noise.** best.")
    assert "Rule: the rule" in lines
    row = lines.index("## Configurations (reward: mean over seeds [95% interval])") + 4
    assert lines[row] == ("| 0 | constant | 1 | 0.4375 [0.4, 0.47] | baseline | – | 0.5 | 0.4 | 0.9 | 3 | 1/1 / 0/1 | "
                          "0/1 / 0/1 |")
    header = lines.index("| trial | status | val reward | reward before | val NLL | pass@1 | pass@16 | distinct correct "
                         "| val entropy | train H first 20% | train H last 20% | collapsed | never committed | s | error |")
    assert lines[header + 2] == ("| coef=0_sched=constant_seed=0 | complete | 0.4375 | – | 0.4661 | – | – | – | – | – | "
                                 "– | **yes** | no | 13 | – |")
    assert lines[header + 3].endswith("| RuntimeError: a \\| b c |")  # pipes escaped, one line
    assert lines[-1] == "- note one" and text.endswith("\n")
    nobody = write_results_md(ROWS, None, tmp_path / "results.md")
    assert "**Pick:** none (no trial finished with the pick metric)." in nobody.read_text()