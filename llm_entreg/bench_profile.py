"""Where a fused head's wall time goes, in one process: timed steps, GPU clocks, kernel time and the idle rest.

Session 3 put "8-11 ms of idle GPU" on the gemm mode by subtracting one process's profiled kernel time from another
process's wall time. That difference mixes real gaps with clock changes between processes (the head-shaped matmul
rate moved 680-809 TFLOP/s between processes on the same H200). This measures both in the same process, per
implementation:

- ``wall``: median of timed forward+backward steps (CUDA events), while ``nvidia-smi`` samples the SM clock, the
  power draw and the clock-event reasons (power cap, thermal slowdown) every ~50 ms;
- ``host``: the time the host takes to issue one step (the GPU runs asynchronously: host well below wall means the
  step is not bound by Python or launch overhead, so CUDA graphs would not buy anything);
- ``kernels``: one profiled step's summed GPU kernel time, with the wall of that same step; ``gap`` = wall - kernels
  is the GPU's idle time between launches in that step.

The pure parts (parsing and summarising the sampler's lines) are tested on the CPU; the rest needs CUDA.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

#: nvidia-smi fields sampled during the timed steps (``clocks_event_reasons`` needs driver >= 535; older drivers
#: take the older name, see :func:`smi_fields`).
SMI_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
#: NVML clock-event reason bits (``nvmlClocksEventReason*``), for the reasons seen during the timed steps.
CLOCK_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def parse_smi_line(line: str, fields=SMI_FIELDS) -> dict | None:
    """One ``--format=csv,noheader,nounits`` line -> ``{field: float | int | None}``; None for a line that is not a
    sample (a header, an error message). Values nvidia-smi cannot read (``[N/A]``) become None."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) != len(fields):
        return None
    out: dict = {}
    for name, raw in zip(fields, parts):
        if raw.startswith("[") or raw in ("", "N/A"):
            out[name] = None
            continue
        try:
            out[name] = int(raw, 16) if raw.lower().startswith("0x") else float(raw)
        except ValueError:
            return None
    if all(v is None for v in out.values()):
        return None
    return out


def decode_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clock-event reason mask (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_REASONS)
    if rest:
        names.append(hex(rest))
    return names


def summarize_samples(samples: list[dict]) -> dict:
    """Median and range of the SM clock and power, the hottest temperature, and every clock-event reason seen."""
    out: dict = {"samples": len(samples)}

    def col(name):
        return [s[name] for s in samples if s.get(name) is not None]

    clocks, power, temp = col("clocks.sm"), col("power.draw"), col("temperature.gpu")
    if clocks:
        out.update(sm_clock_mhz_median=statistics.median(clocks), sm_clock_mhz_min=min(clocks),
                   sm_clock_mhz_max=max(clocks))
    if power:
        out.update(power_w_median=statistics.median(power), power_w_max=max(power))
    if temp:
        out["temperature_c_max"] = max(temp)
    masks = [int(m) for m in col("clocks_event_reasons.active")]
    if masks:
        seen = 0
        for m in masks:
            seen |= m
        out["clock_reasons"] = decode_reasons(seen)
        # the share of samples held back by power or heat (idle and the applications-clock setting are not limits)
        limiting = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
        out["limited_fraction"] = sum(1 for m in masks if m & limiting) / len(masks)
    return out


def smi_index(visible: str | None = None) -> str:
    """nvidia-smi's index (or UUID) of the GPU this process sees as ``cuda:0``: the first entry of
    ``CUDA_VISIBLE_DEVICES`` when set, else 0 (nvidia-smi ignores that variable)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    first = (visible or "").split(",")[0].strip()
    return first if first else "0"


def smi_fields(index: int | str = 0) -> tuple[str, ...] | None:
    """The sampled fields this driver accepts (the reasons under their current or their older name), or None when
    there is no usable ``nvidia-smi``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active", None):
        fields = SMI_FIELDS[:3] + ((reasons,) if reasons else ())
        try:
            proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                   "-i", str(index)], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode == 0 and parse_smi_line(proc.stdout.splitlines()[0] if proc.stdout else "", fields):
            return fields
    return None


class ClockSampler:
    """``with ClockSampler(cmd, fields) as s: ...`` runs ``cmd`` (one ``nvidia-smi --query-gpu`` sample) over and
    over in a thread for the duration of the block; ``s.samples`` then holds the parsed lines. A fresh process per
    sample, rather than ``nvidia-smi -lms``: a looping nvidia-smi writing into a pipe may buffer its output and lose it
    when stopped. ``cmd`` None: a no-op (no samples)."""

    def __init__(self, cmd: list[str] | None, fields=SMI_FIELDS, period_s: float = 0.05):
        self.cmd = cmd
        self.fields = fields
        self.period_s = period_s
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def for_gpu(cls, index: int | str | None = None, period_s: float = 0.05) -> "ClockSampler":
        index = smi_index() if index is None else index
        fields = smi_fields(index)
        if fields is None:
            return cls(None)
        cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", str(index)]
        return cls(cmd, fields, period_s)

    def _sample_once(self) -> bool:
        """One sample; False (and the reason in ``errors``) when the command cannot run: sampling then stops."""
        try:
            proc = subprocess.run(self.cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.errors.append(f"{self.cmd[0]}: {exc!r}")
            return False
        if proc.returncode != 0:
            self.errors.append(f"{self.cmd[0]}: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
            return False
        # the older name of the reasons field is stored under the current one; a missing field as None
        names = list(self.fields) + [None] * (len(SMI_FIELDS) - len(self.fields))
        for line in proc.stdout.splitlines():
            s = parse_smi_line(line, self.fields)
            if s is not None:
                self.samples.append({name: s.get(f) if f else None for name, f in zip(SMI_FIELDS, names)})
        return True

    def _loop(self) -> None:
        while not self._stop.is_set() and self._sample_once():
            self._stop.wait(self.period_s)

    def __enter__(self) -> "ClockSampler":
        if self.cmd is not None:
            self._thread = threading.Thread(target=self._loop, name="clock-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)


def kernel_time_s(prof) -> float:
    """Summed GPU time of a profile's device events (kernels, memsets, copies), in seconds."""
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def profile_impl(impl, inputs, steps: int, warmup: int, sampler_factory, rows: int = 12,
                 trace: Path | None = None, activities=None) -> dict:
    """Timed steps with clock samples, host issue time, and one profiled step of ``impl`` (CUDA); ``trace``: where
    to write the profiled step's Chrome trace, gzipped; ``activities``: the profiler's (default: CUDA kernels only,
    so the summed time is GPU time)."""
    from .bench import _loss

    hidden, weight, targets, g_lp, g_h = inputs

    def step():
        hidden.grad = weight.grad = None
        _loss(impl, hidden, weight, targets, g_lp, g_h).backward()

    walls = []
    with sampler_factory() as sampler:  # started before the warm-up: nvidia-smi takes a moment to start sampling
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            walls.append(a.elapsed_time(b) / 1e3)
    t0 = time.perf_counter()
    step()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    if activities is None:
        activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
    prof_wall = a.elapsed_time(b) / 1e3
    kernels = kernel_time_s(prof)
    if trace is not None:
        raw = trace.with_suffix("")  # x.json.gz -> x.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return {
        "wall_s": walls,
        "wall_median_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "host_issue_s": host,
        "profiled_wall_s": prof_wall,
        "kernel_s": kernels,
        "gap_s": prof_wall - kernels,
        "clocks": {**summarize_samples(sampler.samples), **({"errors": sampler.errors} if sampler.errors else {})},
        "table": prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=60),
    }


def run(impls: list[str], n: int, d: int, vocab: int, dtype: torch.dtype, steps: int, warmup: int, rounds: int,
        out: Path | None, log=print) -> dict:
    """Profile every implementation ``rounds`` times in turn (impl A, B, ..., A, B, ...) on the same inputs."""
    from .bench import _restore_triton_defaults, make_inputs, resolve_impl

    if not torch.cuda.is_available():
        raise RuntimeError("bench_profile needs CUDA (kernel times and GPU clocks)")
    device = torch.device("cuda")
    inputs = make_inputs(n, d, vocab, dtype, device, seed=0)
    resolved = {}
    for spec in impls:
        impl, why = resolve_impl(spec, device)
        if impl is None:
            log(f"{spec}: skipped ({why})")
            continue
        resolved[spec] = impl
    report: dict = {"n": n, "d": d, "vocab": vocab, "dtype": str(dtype), "steps": steps, "warmup": warmup,
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}}
    for r in range(rounds):
        for spec, impl in resolved.items():
            trace = None
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                safe = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in spec)
                trace = out / f"trace_{safe}_r{r}.json.gz"
            try:
                res = profile_impl(impl, inputs, steps, warmup, ClockSampler.for_gpu, trace=trace)
            except Exception as exc:  # one implementation failing (an OOM, a missing package) must not end the stage
                log(f"## round {r} {spec}: FAILED {exc!r}")
                report["results"].setdefault(spec, []).append({"error": repr(exc)})
                continue
            finally:
                _restore_triton_defaults()
                inputs[0].grad = inputs[1].grad = None
                torch.cuda.empty_cache()
            report["results"].setdefault(spec, []).append(res)
            c = res["clocks"]
            log(f"## round {r} {spec}: wall median {res['wall_median_s'] * 1e3:.1f} ms (min "
                f"{res['wall_min_s'] * 1e3:.1f}); host issue {res['host_issue_s'] * 1e3:.1f} ms; profiled step: wall "
                f"{res['profiled_wall_s'] * 1e3:.1f} ms = kernels {res['kernel_s'] * 1e3:.1f} + idle gaps "
                f"{res['gap_s'] * 1e3:.1f}; SM clock median {c.get('sm_clock_mhz_median', '?')} MHz (min "
                f"{c.get('sm_clock_mhz_min', '?')}), power median {c.get('power_w_median', '?')} W, reasons "
                f"{c.get('clock_reasons', '?')}, {c.get('samples', 0)} samples")
            log(res["table"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
    return report
