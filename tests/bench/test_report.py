"""llm_entreg.bench.report: the /proc peak-RSS readers, system info, the kernel benchmark's ratios and markdown, the
step benchmark's comparisons and tables, on hand-made results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llm_entreg.bench import report as rp

LINUX_PROC = os.path.exists("/proc/self/status")


@pytest.mark.skipif(not LINUX_PROC, reason="Linux /proc only")
def test_proc_status_and_peak_reset():
    rss, hwm = rp.proc_status_kib("VmRSS"), rp.proc_status_kib("VmHWM")
    assert rss > 0 and hwm >= rss
    assert rp.proc_status_kib("NoSuchField") is None
    if rp.reset_peak_rss():  # a kernel that allows clear_refs: the peak drops back to about the current RSS
        block = b"\x01" * (64 * 2**20)  # written: +64 MiB of RSS, then freed
        assert len(block) == 64 * 2**20
        del block
        assert rp.proc_status_kib("VmHWM") >= rp.proc_status_kib("VmRSS") + 48 * 1024
        assert rp.reset_peak_rss()
        assert rp.proc_status_kib("VmHWM") < rp.proc_status_kib("VmRSS") + 32 * 1024


def test_system_info():
    v = rp.versions(("torch", "no_such_module_here"))
    assert v["torch"] == torch.__version__ and v["no_such_module_here"] is None and v["python"]
    info = rp.device_info(torch.device("cpu"))
    assert info["device"] == "cpu" and info["cpu_model"] and f"{info['cpu_count']} cores" in info["name"]
    step = rp.step_device_info(torch.device("cpu"))
    assert step["name"].endswith("torch threads)") and "cpu_model" not in step
    env = rp.subprocess_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(rp.__file__).resolve().parents[2])


def test_formatting():
    assert rp.fmt(None) == "-" and rp.fmt(1.234) == "1.23" and rp.fmt(None, ".1f", "n/a") == "n/a"
    assert rp.mib(None) is None and rp.mib(3 * 2**20) == 3
    assert rp.fmt_time(None) == "-" and rp.fmt_time({"error": "x"}) == "error"
    assert rp.fmt_time({"median_s": 1.5, "min_s": 1.0, "max_s": 2.25}) == "1,500.0 (1,000.0–2,250.0)"
    assert rp.fmt_load(None) == "n/a" and rp.fmt_load([1, 2.5]) == "1.00, 2.50"


def _timing(median, lo=None):
    return {"median_s": median, "min_s": lo or median, "max_s": median, "cpu_median_s": median,
            "tflops": 1.0, "fraction_of_mm": 0.5}


def _mem(extra, excl):
    return {"status": "ok", "peak_extra_bytes": extra, "peak_extra_excl_grads_bytes": excl}


RESULTS = {
    "naive": {"status": "ok", "note": "materialized", "check": {"passed": True, "max_abs_diff_logprobs": 1e-6,
                                                                "max_abs_diff_entropy": 2e-6,
                                                                "grad_rel_err_hidden": 1e-7,
                                                                "grad_rel_err_weight": 2e-7},
              "fwd": _timing(2.0), "fwdbwd": _timing(4.0), "memory": {"fwdbwd": _mem(8 * 2**20, 6 * 2**20)}},
    "trl_chunked": {"status": "ok", "check": {"passed": True, "max_abs_diff_logprobs": 1e-6},
                    "fwd": _timing(1.0), "fwdbwd": _timing(2.0, 1.5), "memory": {}},
    "ours_chunked": {"status": "ok", "check": {"passed": True, "max_abs_diff_logprobs": 1e-6},
                     "fwd": _timing(0.5), "fwdbwd": _timing(1.0, 0.75),
                     "memory": {"fwdbwd": _mem(2 * 2**20, 2**20)},
                     "check_sampled": {"passed": True, "token_rows": 8, "vocab_rows": 8,
                                       "max_abs_diff_logprobs": 3e-6}},
    "broken": {"status": "check_failed", "check": {"passed": False, "error": "RuntimeError: boom"}},
    "ours_triton": {"status": "skipped", "reason": "CUDA only"},
}


def test_head_ratios():
    r = rp.head_ratios(RESULTS)
    assert set(r) == {"naive", "trl_chunked", "ours_chunked"}  # only implementations that ran
    ours = r["ours_chunked"]
    assert ours["fwdbwd_time_vs_trl_chunked"] == 0.5 and ours["fwd_time_vs_trl_chunked"] == 0.5
    assert ours["fwdbwd_min_time_vs_trl_chunked"] == 0.5 and ours["fwdbwd_cpu_time_vs_trl_chunked"] == 0.5
    assert ours["fwdbwd_time_vs_naive"] == 0.25
    assert ours["fwdbwd_mem_vs_naive"] == 0.25 and ours["fwdbwd_mem_excl_grads_vs_naive"] == pytest.approx(1 / 6)
    assert ours["fwd_mem_vs_naive"] is None  # not measured
    assert rp.median_of(RESULTS["broken"], "fwd") is None and rp.mem_of(RESULTS["trl_chunked"], "fwdbwd") is None


def test_render_head_markdown():
    report = {
        "config": {"n": 8, "d": 4, "vocab": 11, "dtype": "fp32", "repeats": 3, "warmup": 1, "order": "interleaved",
                   "flops": "F", "loss": "L"},
        "device": {"device": "cpu", "name": "a CPU"},
        "matmul_reference": {"shape": [8, 4, 11], "flops_per_s": 2e12},
        "meta": {"command": "python scripts/bench_head.py --quick", "date_utc": "2026-01-01T00:00:00Z",
                 "torch": "2", "trl": "1", "loadavg_start": [0.5, 0, 0], "loadavg_end": None},
        "results": RESULTS,
        "ratios": rp.head_ratios(RESULTS),
    }
    md = rp.render_head_markdown(report)
    assert md.startswith("### N=8, d=4, V=11, fp32 — a CPU\n")
    assert "- command: `python scripts/bench_head.py --quick`" in md and "0.50, 0.00, 0.00 / n/a" in md
    assert "2.000 TFLOP/s" in md
    assert "| ours_triton | skipped: CUDA only | | | | | | | |" in md
    assert "| naive | ok 1.0e-06 / 2.0e-06 / 2.0e-07 | 2,000.0 (2,000.0–2,000.0) | 4,000.0 (4,000.0–4,000.0) " in md
    assert "| broken | FAILED - / n/a / n/a (RuntimeError: boom) |" in md
    assert "| ours_chunked | 0.500 | 0.500 | 0.500 | 0.500 | 0.250 | - | 0.250 | 0.167 |" in md
    assert "Full-size check against float64 on 8 sampled token rows" in md and "| ours_chunked | 3.0e-06 | n/a" in md
    assert "Notes: `naive`: materialized" in md and "one fresh subprocess per implementation and mode" in md


STEP_RESULTS = {
    "dpo_ours_b0": {"name": "dpo_ours_b0", "algo": "dpo", "impl": "ours", "status": "ok", "entropy_coef": 0.0,
                    "head": "ours (chunked)", "step_s": 1.0, "peak_mem_bytes": 2 * 2**20, "first_loss": 0.69,
                    "losses": [0.69, 0.6], "first_log": {"loss": 0.69, "entropy": 5.0}},
    "dpo_trl": {"name": "dpo_trl", "algo": "dpo", "impl": "trl", "status": "ok", "entropy_coef": 0.0,
                "step_s": 2.0, "peak_mem_bytes": 4 * 2**20, "first_loss": 0.7, "losses": [0.7, 0.5],
                "first_log": {"loss": 0.7, "entropy": 5.5}},
    "dpo_ours": {"name": "dpo_ours", "algo": "dpo", "impl": "ours", "status": "ok", "entropy_coef": 0.01,
                 "step_s": 1.0, "peak_mem_bytes": 2 * 2**20, "first_loss": 0.6, "losses": [0.6],
                 "first_log": {}},
    "grpo_trl": {"name": "grpo_trl", "algo": "grpo", "impl": "trl", "status": "oom",
                 "error": "OutOfMemoryError: CUDA | out of memory"},
}


def test_step_comparisons():
    comp = rp.step_comparisons(STEP_RESULTS)
    assert comp["ratios"]["dpo_ours_b0"] == {"step_s_vs_trl": 0.5, "peak_mem_vs_trl": 0.5}
    assert comp["ratios"]["dpo_trl"]["step_s_vs_trl"] == 1.0 and comp["ratios"]["grpo_trl"] == {}
    (pair,) = comp["first_loss_agreement"]  # dpo_ours has another β: no pair
    assert (pair["ours"], pair["trl"]) == ("dpo_ours_b0", "dpo_trl")
    assert pair["abs_diff"] == pytest.approx(0.01) and pair["max_abs_diff_all_steps"] == pytest.approx(0.1)
    assert pair["first_step_metrics"] == {"entropy": {"ours": 5.0, "trl": 5.5, "abs_diff": 0.5}}


def test_render_step_markdown_and_short_table():
    report = {
        "config": {"model": {"vocab_size": 99, "hidden_size": 8, "num_hidden_layers": 2}, "shape": "tiny",
                   "dtype": "fp32", "batch": 4, "num_generations": 2, "prompt_len": 3, "completion_len": 5,
                   "steps": 2, "warmup": 1, "gradient_checkpointing": True, "backend": "auto", "grpo_iterations": None,
                   "isolation": "inprocess", "configs": [{}] * 5},
        "device": {"device": "cpu", "name": "a CPU"},
        "meta": {"command": "python scripts/bench_step.py --tiny", "date_utc": "D", "torch": "2", "trl": "1",
                 "transformers": "5", "complete": False},
        "results": STEP_RESULTS,
        "comparisons": rp.step_comparisons(STEP_RESULTS),
    }
    md = rp.render_step_markdown(report)
    assert md.startswith("### End-to-end step: Qwen2-architecture tiny (V=99, d=8, 2 layers), fp32 — a CPU")
    assert "- **partial**: 4 of 5 configurations so far" in md and "GRPO num_iterations 2" in md
    assert "| dpo_ours_b0 | ours (chunked) | 0 | ok | 1.000 | — | — | 0.50 | 2 | — | 0.50 | 0.69 |" in md
    assert "| grpo_trl | — | — | oom: OutOfMemoryError: CUDA / out of memory |" in md
    assert "| dpo_ours_b0 | dpo_trl | 0 | 0.69 | 0.7 | 1.00e-02 | 1.00e-01 |" in md
    assert "in-process, so indicative" in md
    table = rp.step_short_table(report).splitlines()
    assert table[0].split() == ["config", "status", "step", "s", "gen", "s", "loss", "s", "peak", "MiB", "first",
                                "loss"]
    assert table[1].split() == ["dpo_ours_b0", "ok", "1.0000", "—", "—", "2", "0.69"]


def test_write_files(tmp_path):
    report = {"files": {"json": str(tmp_path / "r.json"), "markdown": str(tmp_path / "r.md")}, "x": 1}
    rp.write_files(report, "# table\n")
    assert json.loads((tmp_path / "r.json").read_text()) == report and (tmp_path / "r.md").read_text() == "# table\n"
