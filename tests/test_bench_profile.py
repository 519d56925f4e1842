"""The pure parts of llm_entreg.bench_profile: nvidia-smi sample lines, clock-event reasons, the sampler's plumbing.

The profiling itself needs CUDA (kernel times, GPU clocks) and runs in scripts/device_issue7.sh's profile stage.
"""

from __future__ import annotations

import sys
import time

import pytest

from llm_entreg import bench_profile as bp

# Lines as driver 580's `nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active
# --format=csv,noheader,nounits` prints them (one line per call).
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


def test_smi_index_follows_cuda_visible_devices():
    assert bp.smi_index("") == "0"
    assert bp.smi_index("3") == "3"
    assert bp.smi_index("2,5") == "2"
    assert bp.smi_index("GPU-8f2c0a1e-aaaa-bbbb-cccc-000000000000") == "GPU-8f2c0a1e-aaaa-bbbb-cccc-000000000000"


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


def _fake_smi(lines, counter):
    """A stand-in for one `nvidia-smi --query-gpu` call: prints its lines, counts its runs in ``counter``."""
    return [sys.executable, "-c",
            "import pathlib\n"
            f"p = pathlib.Path({str(counter)!r})\n"
            "p.write_text(str(int(p.read_text()) + 1) if p.exists() else '1')\n"
            f"print({chr(10).join(lines)!r})\n"]


def _wait_for_runs(counter, runs, timeout=60.0):
    deadline = time.time() + timeout
    while not (counter.exists() and counter.read_text() and int(counter.read_text()) >= runs):
        assert time.time() < deadline, "the stand-in sampler did not run"
        time.sleep(0.05)


def test_clock_sampler_samples_until_the_block_ends(tmp_path):
    counter = tmp_path / "runs"
    with bp.ClockSampler(_fake_smi(LINES, counter), period_s=0.01) as s:
        _wait_for_runs(counter, 2)
    runs = int(counter.read_text())
    assert runs >= 2
    # every run's three readable lines, in order; the unreadable ones dropped
    assert [x["clocks.sm"] for x in s.samples] == [1980.0, 1755.0, 1830.0] * runs
    time.sleep(0.3)
    assert int(counter.read_text()) == runs  # stopped with the block


def test_clock_sampler_maps_the_older_reasons_name(tmp_path):
    counter = tmp_path / "runs"
    fields = bp.SMI_FIELDS[:3] + ("clocks_throttle_reasons.active",)
    with bp.ClockSampler(_fake_smi(["1700, 650, 55, 0x4"], counter), fields) as s:
        _wait_for_runs(counter, 1)
    assert s.samples[0] == {"clocks.sm": 1700.0, "power.draw": 650.0, "temperature.gpu": 55.0,
                            "clocks_event_reasons.active": 4}


def test_clock_sampler_without_the_reasons_field(tmp_path):
    counter = tmp_path / "runs"
    with bp.ClockSampler(_fake_smi(["1700, 650, 55"], counter), bp.SMI_FIELDS[:3]) as s:
        _wait_for_runs(counter, 1)
    assert s.samples[0] == {"clocks.sm": 1700.0, "power.draw": 650.0, "temperature.gpu": 55.0,
                            "clocks_event_reasons.active": None}
    assert "clock_reasons" not in bp.summarize_samples(s.samples)


def test_clock_sampler_records_a_failing_command():
    with bp.ClockSampler(["/nonexistent/nvidia-smi"], period_s=0.01) as s:
        time.sleep(0.2)
    assert s.samples == [] and len(s.errors) == 1 and "nonexistent" in s.errors[0]  # tried once, then gave up


def test_clock_sampler_stops_on_a_nonzero_exit():
    with bp.ClockSampler([sys.executable, "-c", "import sys; sys.exit('no GPU found')"], period_s=0.01) as s:
        time.sleep(0.5)
    assert s.samples == [] and s.errors == [f"{sys.executable}: exit 1: no GPU found"]


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
