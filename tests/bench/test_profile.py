"""llm_entreg.bench.profile on the CPU: nvidia-smi sample lines, clock-event reasons, interval union, spec checks,
the sampler thread on stand-in commands, and profile_impl's plumbing with faked CUDA events.

The profiling itself needs CUDA (kernel times, GPU clocks) and runs in scripts/gpu/benchmark_suite.sh's profile stage.
"""

from __future__ import annotations

import gzip
import json
import sys
import time

import pytest
import torch

from llm_entreg.bench import profile as bp

# Lines as driver 580's `nvidia-smi --query-gpu=clocks.sm,power.draw.instant,temperature.gpu,clocks_event_reasons.active
# --format=csv,noheader,nounits` prints them, with an unreadable sample and an error line.
LINES = [
    "1980, 312.45, 41, 0x0000000000000000",
    "1755, 699.80, 58, 0x0000000000000004",
    "1830, 688.10, 60, 0x0000000000000024",
    "[N/A], [N/A], [N/A], [N/A]",
    "Failed to initialize NVML",
]


def test_parse_smi_line():
    assert bp.parse_smi_line(LINES[1]) == {"clocks.sm": 1755.0, "power.draw": 699.8, "temperature.gpu": 58.0,
                                           "clocks_event_reasons.active": 4}
    assert bp.parse_smi_line(LINES[3]) is None  # nothing readable
    assert bp.parse_smi_line(LINES[4]) is None
    assert bp.parse_smi_line("clocks.sm [MHz], power.draw [W], temperature.gpu, reasons") is None  # a header
    assert bp.parse_smi_line("1980, [N/A], 41, 0x0")["power.draw"] is None
    # a variant without the reasons field: three values, stored under the canonical names by position
    assert bp.parse_smi_line("1700, 650, 55", bp.SMI_VARIANTS[-1]) == {
        "clocks.sm": 1700.0, "power.draw": 650.0, "temperature.gpu": 55.0, "clocks_event_reasons.active": None}
    assert bp.parse_smi_line("1700, 650, 55") is None  # three values where four were asked for


def test_decode_reasons():
    assert bp.decode_reasons(0) == []
    assert bp.decode_reasons(0x24) == ["sw_power_cap", "sw_thermal_slowdown"]
    assert bp.decode_reasons(0x1000 | 0x1) == ["gpu_idle", "0x1000"]


def test_summarize_samples():
    samples = [s for s in map(bp.parse_smi_line, LINES) if s]
    got = bp.summarize_samples(samples)
    assert got["samples"] == 3
    assert got["sm_clock_mhz_median"] == 1830 and got["sm_clock_mhz_min"] == 1755 and got["sm_clock_mhz_max"] == 1980
    assert got["power_w_median"] == pytest.approx(688.1) and got["power_w_max"] == pytest.approx(699.8)
    assert got["temperature_c_max"] == 60
    assert got["clock_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert got["limited_fraction"] == pytest.approx(2 / 3)
    assert bp.summarize_samples([]) == {"samples": 0}


def test_limited_fraction_counts_unknown_bits_but_not_idle():
    samples = [{"clocks_event_reasons.active": m} for m in (0x1, 0x2 | 0x10, 0x1000, 0x0)]
    assert bp.summarize_samples(samples)["limited_fraction"] == pytest.approx(1 / 4)


def test_in_window():
    samples = [{"t": t} for t in (0.5, 1.0, 1.5, 2.0, 2.5)]
    assert [s["t"] for s in bp.in_window(samples, 1.0, 2.0)] == [1.0, 1.5, 2.0]


def test_busy_time_is_the_union_of_intervals():
    assert bp.busy_time([]) == 0
    assert bp.busy_time([(0, 2), (5, 6)]) == 3
    assert bp.busy_time([(5, 6), (0, 2), (1, 3)]) == 4  # overlap counted once, unsorted input
    assert bp.busy_time([(0, 10), (2, 3), (4, 5)]) == 10  # nested
    assert bp.busy_time([(0, 1), (1, 2)]) == 2  # touching


def test_check_specs_names_the_bad_one():
    bp.check_specs(["ours_triton", "ours_triton@+tiles", "trl_chunked@4096", "ours_fused_loss@8192"])
    with pytest.raises(ValueError, match="'ours_trition'"):
        bp.check_specs(["ours_triton", "ours_trition"])
    with pytest.raises(ValueError, match="'ours_triton@\\+gemmm'"):  # a bad knob of a known implementation
        bp.check_specs(["ours_triton@+gemmm"])
    with pytest.raises(ValueError, match="'trl_chunked@big'"):
        bp.check_specs(["trl_chunked@big"])


def test_smi_targets():
    # no CUDA here: no UUID, so CUDA_VISIBLE_DEVICES' first entry, then 0
    if torch.cuda.is_available():
        pytest.skip("checks the order without a CUDA device's UUID")
    assert bp.smi_targets("") == ["0"]
    assert bp.smi_targets("3") == ["3", "0"]
    assert bp.smi_targets("2,5") == ["2", "0"]
    assert bp.smi_targets("0") == ["0"]


def _fake_smi(lines, counter, delay=0.0):
    """A stand-in for one `nvidia-smi --query-gpu` call: takes ``delay`` seconds, prints its lines, then counts its
    runs in ``counter`` (written whole, by rename, so a reader never sees it half-written)."""
    return [sys.executable, "-c",
            "import os, pathlib, time\n"
            f"time.sleep({delay})\n"
            f"p = pathlib.Path({str(counter)!r})\n"
            f"print({chr(10).join(lines)!r}, flush=True)\n"
            "tmp = p.with_suffix('.tmp')\n"
            "tmp.write_text(str(int(p.read_text()) + 1) if p.exists() else '1')\n"
            "os.replace(tmp, p)\n"]


def _runs(counter) -> int:
    return int(counter.read_text()) if counter.exists() else 0


def _wait_for_runs(counter, runs, timeout=60.0):
    deadline = time.time() + timeout
    while _runs(counter) < runs:
        assert time.time() < deadline, "the stand-in sampler did not run"
        time.sleep(0.05)


def test_clock_sampler_samples_until_the_block_ends(tmp_path):
    counter = tmp_path / "runs"
    t_start = time.monotonic()
    with bp.ClockSampler(_fake_smi(LINES, counter), period_s=0.01) as s:
        _wait_for_runs(counter, 2)
    runs = _runs(counter)
    assert runs >= 2
    # every run's three readable lines, in order, time-stamped; the unreadable ones dropped
    assert [x["clocks.sm"] for x in s.samples] == [1980.0, 1755.0, 1830.0] * runs
    assert all(t_start <= x["t"] <= time.monotonic() for x in s.samples)
    time.sleep(0.3)
    assert _runs(counter) == runs  # stopped with the block


def test_clock_sampler_keeps_a_fixed_rate(tmp_path):
    """The next sample is due one period after the previous one was due, not one period after it returned."""
    counter = tmp_path / "runs"
    with bp.ClockSampler(_fake_smi(["1700, 650, 55, 0x4"], counter, delay=0.3), period_s=1.0) as s:
        _wait_for_runs(counter, 3)
    ts = [x["t"] for x in s.samples]
    # two periods apart: 2.0 s at a fixed rate (while a run takes under a period); 2 x (1.0 + 0.3 + start-up)
    # >= 2.6 s if the period ran from each run's end
    assert len(ts) >= 3 and 1.8 < ts[2] - ts[0] < 2.5


def test_clock_sampler_records_a_failing_command():
    with bp.ClockSampler(["/nonexistent/nvidia-smi"], period_s=0.01) as s:
        time.sleep(0.2)
    assert s.samples == [] and len(s.errors) == 1 and "nonexistent" in s.errors[0]  # tried once, then gave up


def test_clock_sampler_stops_on_a_nonzero_exit():
    with bp.ClockSampler([sys.executable, "-c", "import sys; sys.exit('no GPU found')"], period_s=0.01) as s:
        time.sleep(0.5)
    assert s.samples == [] and s.errors == [f"{sys.executable}: exit 1: no GPU found"]


def test_clock_sampler_without_a_command_is_a_no_op():
    with bp.ClockSampler(None, note="nvidia-smi not on PATH") as s:
        pass
    assert s.samples == [] and bp.summarize_samples(s.samples) == {"samples": 0}


class _FakeEvent:
    """torch.cuda.Event on a CPU: wall time between record() calls."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_profile_impl_runs_its_steps_and_writes_a_trace(tmp_path, monkeypatch):
    """profile_impl's plumbing on the CPU (CUDA events and synchronize faked, CPU profiler activity): the step really
    runs (gradients appear), every figure is there and consistent, only the timed steps' clock samples are
    summarised, the trace is a gzipped Chrome trace."""
    from llm_entreg.bench.head import make_inputs
    from llm_entreg.bench.impls import resolve_impl

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    impl, why = resolve_impl("ours_chunked", torch.device("cpu"))
    assert impl is not None, why
    inputs = make_inputs(16, 8, 50, torch.float32, torch.device("cpu"), seed=0)
    calls = []
    orig = impl.fn

    def counted(*a):
        calls.append(time.monotonic())
        return orig(*a)

    impl.fn = counted

    class Sampler(bp.ClockSampler):
        """Samples stamped before, during and after the block's steps."""

        def __exit__(self, *exc):
            now = time.monotonic()
            self.samples = [{"clocks.sm": 1000.0, "t": calls[0] - 1}, {"clocks.sm": 1500.0, "t": calls[2]},
                            {"clocks.sm": 1600.0, "t": calls[3]}, {"clocks.sm": 900.0, "t": now + 1}]

    trace = tmp_path / "trace.json.gz"
    res = bp.profile_impl(impl, inputs, steps=3, warmup=1, sampler_factory=lambda: Sampler(None), trace=trace,
                          activities=[torch.profiler.ProfilerActivity.CPU])
    assert len(calls) == 1 + 3 + 1 + 1  # warm-up, timed, host issue, profiled
    assert inputs[0].grad is not None and inputs[1].grad is not None
    assert len(res["wall_s"]) == 3 and min(res["wall_s"]) == res["wall_min_s"] > 0
    # no GPU events on a CPU: the GPU was "busy" for 0 s and the whole profiled step is gap
    assert res["busy_s"] == res["kernel_sum_s"] == 0.0 and res["gap_s"] == res["profiled_wall_s"] > 0
    assert res["clocks"]["samples"] == 2 and res["clocks"]["samples_all"] == 4
    assert res["clocks"]["sm_clock_mhz_min"] == 1500 and res["clocks"]["sm_clock_mhz_max"] == 1600
    assert "traceEvents" in json.loads(gzip.open(trace).read())
    assert not trace.with_suffix("").exists()


def test_run_checks_names_then_needs_cuda():
    with pytest.raises(ValueError, match="'nope'"):
        bp.run(["ours_triton", "nope"], 8, 8, 10, torch.float32, 1, 0, 1, None)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            bp.run(["ours_triton"], 8, 8, 10, torch.float32, 1, 0, 1, None)
