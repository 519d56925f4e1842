"""Where a fused head's wall time goes, in one process: timed steps with GPU clock samples, host issue time, and one
profiled step's GPU busy time and idle gaps (CUDA only).

Per implementation: ``wall`` (median of timed fwd+bwd steps, CUDA events) while a thread samples the SM clock, power
and clock-event reasons with ``nvidia-smi`` at 10 Hz; ``host`` (time to issue one step); ``busy`` (union of one
profiled step's kernel, copy and memset intervals) and ``gap`` = wall - busy. Measuring all of them in the same
process keeps clock changes between processes out of the gap. The pure parts are tested on the CPU.
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

from .head import make_inputs, run_fwdbwd
from .impls import resolve_impl

#: What is sampled, by position: SM clock (MHz), power (W), temperature (C), clock-event reason mask. The samples
#: use these names whichever variant the driver accepted (see :data:`SMI_VARIANTS`).
SMI_FIELDS = ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
#: Field lists tried in order: the instantaneous power (newer drivers; ``power.draw`` is a 1 s average on recent
#: GPUs), the reasons under their current name (driver >= 535), under the older name, then no reasons.
SMI_VARIANTS = (
    ("clocks.sm", "power.draw.instant", "temperature.gpu", "clocks_event_reasons.active"),
    ("clocks.sm", "power.draw", "temperature.gpu", "clocks_event_reasons.active"),
    ("clocks.sm", "power.draw", "temperature.gpu", "clocks_throttle_reasons.active"),
    ("clocks.sm", "power.draw", "temperature.gpu"),
)
#: NVML clock-event reason bits (``nvmlClocksEventReason*``).
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
#: Reasons that are not limits: idle, the applications-clock setting, sync boost, the display clock. Every other bit
#: (power, heat, and bits newer than this table) counts as holding the clock back.
NOT_LIMITING = 0x1 | 0x2 | 0x10 | 0x100


def parse_smi_line(line: str, fields=SMI_FIELDS) -> dict | None:
    """One ``--format=csv,noheader,nounits`` line -> ``{SMI_FIELDS[i]: value}`` by position (a shorter ``fields``
    leaves the rest None); None for a line that is not a sample (a header, an error message). Values nvidia-smi
    cannot read (``[N/A]``) become None."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) != len(fields):
        return None
    out: dict = {name: None for name in SMI_FIELDS}
    for name, raw in zip(SMI_FIELDS, parts):
        if raw.startswith("[") or raw in ("", "N/A"):
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
    """Median and range of the SM clock and power, the hottest temperature, every clock-event reason seen, and the
    share of samples whose reasons hold the clock back."""
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
        out["limited_fraction"] = sum(1 for m in masks if m & ~NOT_LIMITING) / len(masks)
    return out


def in_window(samples: list[dict], t0: float, t1: float) -> list[dict]:
    """The samples whose time stamp ``t`` lies in ``[t0, t1]``."""
    return [s for s in samples if t0 <= s["t"] <= t1]


def busy_time(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (overlapping kernels on several streams count once)."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def check_specs(specs: list[str]) -> None:
    """Raise ``ValueError`` naming the first implementation spec the bench cannot parse (an unknown name or knob):
    the bench's own :func:`~llm_entreg.bench.impls.resolve_impl`, resolved for the CPU, so that it runs anywhere and
    before any GPU time is spent."""
    for spec in specs:
        try:
            resolve_impl(spec, torch.device("cpu"))
        except ValueError as exc:
            raise ValueError(str(exc) if repr(spec) in str(exc) else f"--impls: {spec!r}: {exc}") from None


def smi_targets(visible: str | None = None) -> list[str]:
    """``nvidia-smi -i`` values to try for the GPU this process sees as ``cuda:0``, best first: its UUID (from torch),
    the first entry of ``CUDA_VISIBLE_DEVICES`` (nvidia-smi ignores that variable), then 0."""
    out: list[str] = []
    if torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(0).uuid)
            out.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:  # an older torch without the field
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    first = (visible or "").split(",")[0].strip()
    if first:
        out.append(first)
    out.append("0")
    return list(dict.fromkeys(out))


def _smi_query(exe: str, target: str, fields) -> list[str]:
    return [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", target]


def smi_command(targets: list[str]) -> tuple[list[str] | None, tuple[str, ...] | None, str]:
    """``(command, fields, note)``: the first target and field variant this ``nvidia-smi`` answers with a readable
    sample, or ``(None, None, why not)``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None, "nvidia-smi not on PATH"
    last = ""
    for target in targets:
        for fields in SMI_VARIANTS:
            cmd = _smi_query(exe, target, fields)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, None, f"nvidia-smi: {exc!r}"
            lines = proc.stdout.splitlines()
            if proc.returncode == 0 and lines and parse_smi_line(lines[0], fields):
                return cmd, fields, f"-i {target}, fields {','.join(fields)}"
            said = (proc.stderr or proc.stdout).strip()[:200]
            last = f"-i {target} {','.join(fields)}: exit {proc.returncode}: {said}"
    return None, None, f"no readable sample; last try {last}"


_SMI_FOUND: list = []


class ClockSampler:
    """``with ClockSampler(cmd, fields) as s: ...`` runs ``cmd`` (one ``nvidia-smi --query-gpu`` sample) at a fixed
    rate in a thread for the duration of the block; ``s.samples`` then holds the parsed lines, each with its time
    stamp ``t`` (``time.monotonic()`` when the command returned). A fresh process per sample, rather than a looping
    ``nvidia-smi -lms``, whose output into a pipe may stay buffered and be lost when it is stopped. ``cmd`` None: a
    no-op (no samples; ``note`` says why)."""

    def __init__(self, cmd: list[str] | None, fields=SMI_FIELDS, period_s: float = 0.1, note: str = ""):
        self.cmd = cmd
        self.fields = fields
        self.period_s = period_s
        self.note = note
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def for_gpu(cls, period_s: float = 0.1) -> "ClockSampler":
        if not _SMI_FOUND:  # probed once per process
            _SMI_FOUND.append(smi_command(smi_targets()))
        cmd, fields, note = _SMI_FOUND[0]
        return cls(cmd, fields or SMI_FIELDS, period_s, note)

    def _sample_once(self) -> bool:
        """One sample; False (and the reason in ``errors``) when the command cannot run: sampling then stops."""
        try:
            proc = subprocess.run(self.cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.errors.append(f"{self.cmd[0]}: {exc!r}")
            return False
        t = time.monotonic()
        if proc.returncode != 0:
            self.errors.append(f"{self.cmd[0]}: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
            return False
        for line in proc.stdout.splitlines():
            s = parse_smi_line(line, self.fields)
            if s is not None:
                self.samples.append({**s, "t": t})
        return True

    def _loop(self) -> None:
        start = time.monotonic()
        k = 0
        while not self._stop.is_set() and self._sample_once():
            k += 1
            # a fixed rate: the next sample is due at start + k * period, however long this one took
            self._stop.wait(max(0.0, start + k * self.period_s - time.monotonic()))

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


def profile_busy_s(prof) -> tuple[float, float]:
    """``(busy, summed)`` seconds of a profile's GPU events (kernels, copies, memsets): the union of their
    intervals, and the plain sum of their durations."""
    dev = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU]
    intervals = [(e.time_range.start, e.time_range.end) for e in dev]
    return busy_time(intervals) / 1e6, sum(end - start for start, end in intervals) / 1e6


def profile_impl(impl, inputs, steps: int, warmup: int, sampler_factory, rows: int = 12,
                 trace: Path | None = None, activities=None) -> dict:
    """Timed steps with clock samples, host issue time, and one profiled step of ``impl`` (CUDA); ``trace``: where
    to write the profiled step's Chrome trace, gzipped; ``activities``: the profiler's (default: CUDA only)."""
    def step():
        run_fwdbwd(impl, inputs)

    walls = []
    with sampler_factory() as sampler:  # started before the warm-up: the first samples take a moment
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        t0 = time.monotonic()
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            walls.append(a.elapsed_time(b) / 1e3)
        t1 = time.monotonic()
    t_host = time.perf_counter()
    step()
    host = time.perf_counter() - t_host
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
    busy, summed = profile_busy_s(prof)
    if trace is not None:
        raw = trace.with_suffix("")  # x.json.gz -> x.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    clocks = summarize_samples(in_window(sampler.samples, t0, t1))
    clocks["samples_all"] = len(sampler.samples)
    if sampler.note:
        clocks["sampler"] = sampler.note
    if sampler.errors:
        clocks["errors"] = sampler.errors
    return {
        "wall_s": walls,
        "wall_median_s": statistics.median(walls),
        "wall_min_s": min(walls),
        "host_issue_s": host,
        "profiled_wall_s": prof_wall,
        "busy_s": busy,
        "kernel_sum_s": summed,
        "gap_s": prof_wall - busy,
        "clocks": clocks,
        "table": prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=60),
    }


def run(impls: list[str], n: int, d: int, vocab: int, dtype: torch.dtype, steps: int, warmup: int, rounds: int,
        out: Path | None, log=print) -> dict:
    """Profile every implementation ``rounds`` times in turn (impl A, B, ..., A, B, ...) on the same inputs;
    ``out/profile.json`` is rewritten after every run, so a stage cut off keeps what it had."""
    check_specs(impls)
    if not torch.cuda.is_available():
        raise RuntimeError("the head profile needs CUDA (kernel times and GPU clocks)")
    device = torch.device("cuda")
    resolved, skipped = {}, {}
    for spec in impls:
        impl, why = resolve_impl(spec, device)
        if impl is None:
            log(f"{spec}: skipped ({why})")
            skipped[spec] = why
        else:
            resolved[spec] = impl
    inputs = make_inputs(n, d, vocab, dtype, device, seed=0)
    report: dict = {"n": n, "d": d, "vocab": vocab, "dtype": str(dtype), "steps": steps, "warmup": warmup,
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": skipped,
                    "results": {}}

    def save():
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))

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
                save()
                continue
            finally:
                inputs[0].grad = inputs[1].grad = None
                torch.cuda.empty_cache()
            report["results"].setdefault(spec, []).append(res)
            save()
            c = res["clocks"]
            log(f"## round {r} {spec}: wall median {res['wall_median_s'] * 1e3:.1f} ms (min "
                f"{res['wall_min_s'] * 1e3:.1f}); host issue {res['host_issue_s'] * 1e3:.1f} ms; profiled step: wall "
                f"{res['profiled_wall_s'] * 1e3:.1f} ms = GPU busy {res['busy_s'] * 1e3:.1f} + idle "
                f"{res['gap_s'] * 1e3:.1f} (kernel sum {res['kernel_sum_s'] * 1e3:.1f}); SM clock median "
                f"{c.get('sm_clock_mhz_median', '?')} MHz (min {c.get('sm_clock_mhz_min', '?')}), power median "
                f"{c.get('power_w_median', '?')} W, reasons {c.get('clock_reasons', '?')}, limited "
                f"{c.get('limited_fraction', '?')}, {c['samples']} samples in the timed steps "
                f"({c.get('sampler') or c.get('errors', '')})")
            log(res["table"])
    save()
    return report
