"""The pure parts of llm_entreg.bench_profile: nvidia-smi sample lines, clock-event reasons, the sampler's plumbing.

The profiling itself needs CUDA (kernel times, GPU clocks) and runs in scripts/device_issue7.sh's profile stage.
"""

from __future__ import annotations

import sys
import time

import pytest

from llm_entreg import bench_profile as bp

# Lines as driver 580's `nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active
# --format=csv,noheader,nounits -lms 50` prints them.
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


def _streaming(lines, ready):
    """A stand-in for `nvidia-smi -lms`: prints its samples, marks ``ready``, then runs until it is terminated."""
    return [sys.executable, "-c",
            "import pathlib, time\n"
            f"for line in {list(lines)!r}:\n"
            "    print(line, flush=True)\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(120)\n"]


def _wait_for(path, timeout=60.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, "the stand-in sampler never started"
        time.sleep(0.05)


def test_clock_sampler_collects_a_streaming_command(tmp_path):
    ready = tmp_path / "ready"
    with bp.ClockSampler(_streaming(LINES, ready)) as s:
        _wait_for(ready)
    assert [x["clocks.sm"] for x in s.samples] == [1980.0, 1755.0, 1830.0]


def test_clock_sampler_maps_the_older_reasons_name(tmp_path):
    ready = tmp_path / "ready"
    fields = bp.SMI_FIELDS[:3] + ("clocks_throttle_reasons.active",)
    with bp.ClockSampler(_streaming(["1700, 650, 55, 0x4"], ready), fields) as s:
        _wait_for(ready)
    assert s.samples == [{"clocks.sm": 1700.0, "power.draw": 650.0, "temperature.gpu": 55.0,
                          "clocks_event_reasons.active": 4}]


def test_clock_sampler_without_the_reasons_field(tmp_path):
    ready = tmp_path / "ready"
    with bp.ClockSampler(_streaming(["1700, 650, 55"], ready), bp.SMI_FIELDS[:3]) as s:
        _wait_for(ready)
    assert s.samples == [{"clocks.sm": 1700.0, "power.draw": 650.0, "temperature.gpu": 55.0,
                          "clocks_event_reasons.active": None}]
    assert "clock_reasons" not in bp.summarize_samples(s.samples)


def test_clock_sampler_without_nvidia_smi_is_a_no_op():
    with bp.ClockSampler(None) as s:
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
    """profile_impl's plumbing on the CPU (CUDA events and synchronize faked): the step really runs (gradients
    appear), every figure is there and consistent, the trace is a gzipped Chrome trace."""
    import gzip
    import json

    import torch

    from llm_entreg.bench import make_inputs, resolve_impl

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    impl, why = resolve_impl("ours_chunked", torch.device("cpu"))
    assert impl is not None, why
    inputs = make_inputs(16, 8, 50, torch.float32, torch.device("cpu"), seed=0)
    calls = []
    orig = impl.fn

    def counted(*a):
        calls.append(1)
        return orig(*a)

    impl.fn = counted
    trace = tmp_path / "trace.json.gz"
    res = bp.profile_impl(impl, inputs, steps=3, warmup=1, sampler_factory=lambda: bp.ClockSampler(None),
                          trace=trace, activities=[torch.profiler.ProfilerActivity.CPU])
    assert len(calls) == 1 + 3 + 1 + 1  # warm-up, timed, host issue, profiled
    assert inputs[0].grad is not None and inputs[1].grad is not None
    assert len(res["wall_s"]) == 3 and min(res["wall_s"]) == res["wall_min_s"] > 0
    assert res["kernel_s"] == 0.0 and res["gap_s"] == res["profiled_wall_s"] > 0  # no GPU kernels on a CPU
    assert res["clocks"] == {"samples": 0}
    assert "traceEvents" in json.loads(gzip.open(trace).read())
    assert not trace.with_suffix("").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only refusal")
def test_run_needs_cuda():
    import torch

    with pytest.raises(RuntimeError, match="needs CUDA"):
        bp.run(["ours_triton"], 8, 8, 10, torch.float32, 1, 0, 1, None)
