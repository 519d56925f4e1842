"""Benchmark of the fused LM head log-prob + entropy: ours vs TRL's chunked path vs naive (vs Liger when importable).

Every implementation runs in ONE process on the SAME inputs, so the ratios printed at the end come from one run:

- ``naive``: ``logits = hidden @ weight.T`` materialized, ``log_softmax``, ``gather``, ``H = -(p * log p).sum()``;
- ``trl_chunked``: ``trl.kernels.ChunkedLogProbFunction`` with ``outputs=("entropy",)`` (what TRL's
  ``add_fused_lm_head`` runs when the entropy is wanted); ``trl_chunked@C`` sets its vocabulary ``chunk_size``;
- ``ours_chunked``: ``linear_logprob_and_entropy(..., backend="chunked")``; ``ours_chunked@TCxVC`` sets the token and
  vocabulary tile sizes of :func:`llm_entreg.ops.chunked.chunked_linear_token_stats`;
- ``ours_triton``: ``backend="triton"`` (CUDA only; under ``TRITON_INTERPRET=1`` on the CPU it is far too slow to time);
  ``ours_triton@+tiles`` / ``ours_triton@+gemm`` force the head's mode (default: ``head_mode``, "gemm" on CUDA),
  ``+bufN`` the gemm mode's fp32 buffer in MiB (``GEMM_BUFFER_BYTES``), ``+accN`` the fp32 accumulator cap in MiB
  (``ACC_BYTES``);
  ``ours_triton@FWD`` or ``ours_triton@FWD/DZ`` (tiles mode) forces the kernels' launch configurations (``128x128x64w8s3``: see
  :class:`llm_entreg.ops.triton_linear.KernelConfig`), ``+splitsN`` / ``+groupN`` / ``+tokenfirst`` the forward's
  ``MIN_SPLITS``, the dz kernel's ``DZ_GROUP`` and the forward's token-block-fastest order (version 1's launch order
  is ``ours_triton@+splits1+group1000000+tokenfirst``: a group larger than the token blocks is token block fastest);
- ``ours_fused_loss``: the loss-fused path (:func:`llm_entreg.ops.fused_linear_loss`, 6NdV) on the same per-token loss
  ``sum g_lp logp + g_H H`` written as its closed-form ``loss_fn``; ``ours_fused_loss@MIB`` sets its chunk budget,
  ``ours_fused_loss_chunked`` forces its torch backend (the default is Triton on CUDA);
- ``ours_torch``: ``backend="torch"`` (the materializing reference path);
- ``liger``: Liger's fused linear cross-entropy (log-prob only, no entropy; its backward takes a scalar loss) when
  ``liger_kernel`` is importable and the device is CUDA;
- ``liger_scaled``: Liger's fused linear *scaled* cross-entropy with ``return_entropy=True`` (per-token NLL and
  entropy, both differentiable: the same loss as ours). On sm90 Liger dispatches to its CuTe DSL kernel (needs the
  ``nvidia-cutlass-dsl`` packages); elsewhere, or ``liger_scaled_fallback``, to its chunked torch fallback.

Per implementation: a correctness guard on a small token slice against a float64 naive reference (forward outputs and
the gradients of hidden/weight) -- an implementation that fails it is not timed; forward-only (no grad) and
forward+backward times (warmup + repeats, median/min/max), where the backward uses random per-token upstream grads for
BOTH outputs (``loss = (g1 * logp).sum() + (g2 * H).sum()``, grads to hidden and weight); peak extra memory (CUDA:
allocator peak minus the baseline after the inputs exist; CPU: a fresh subprocess per implementation and mode, peak
RSS ``VmHWM`` minus ``VmRSS`` right before the measured call); achieved TFLOP/s and the fraction of a measured matmul
rate of the same dtype.

Entry points: :func:`build_parser`, :func:`run_bench` (returns the result dict and writes ``.json`` + ``.md``) and
:func:`main` (what ``scripts/bench_entropy.py`` and ``llm-entreg bench`` call).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llm_entreg.ops import linear_logprob_and_entropy

ALL_IMPLS = ("naive", "trl_chunked", "ours_chunked", "ours_triton", "ours_torch", "ours_fused_loss",
             "ours_fused_loss_chunked", "liger", "liger_scaled", "liger_scaled_fallback")
DEFAULT_IMPLS = "naive,trl_chunked,ours_chunked,ours_triton,liger"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: TRL's add_fused_lm_head vocabulary chunk.
TRL_CHUNK_SIZE = 32768
#: ``--quick``: a size that runs in seconds on a 2-core CPU (odd vocabulary so tiles do not divide it).
QUICK = dict(n=128, d=64, vocab=3001, repeats=3, warmup=1)
#: Tolerances of the correctness guard (vs a float64 naive reference on the check slice).
TOL = {
    torch.float32: {"logprobs": 2e-3, "entropy": 2e-3, "grad_rel": 1e-3},
    torch.bfloat16: {"logprobs": 5e-2, "entropy": 5e-2, "grad_rel": 5e-2},  # bf16 logits: ~1e-2 observed
}
_CHILD_TAG = "BENCH_CHILD_RESULT "


# ----------------------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation: ``fn(hidden, weight, targets) -> (logprobs, entropy or None)``."""

    name: str
    fn: Callable
    #: FLOPs of forward+backward in units of N*d*V (8 with a recomputing backward, 6 when the logits are kept).
    fwdbwd_flop_factor: int = 8
    has_entropy: bool = True
    #: ``loss_fn(hidden, weight, targets, g_lp, g_h) -> scalar`` to backpropagate; default uses both outputs.
    loss_fn: Callable | None = None
    #: whether ``loss_fn`` is the benchmark's loss (``sum g_lp logp + g_H H``), so its gradients can be checked.
    loss_is_reference: bool = False
    #: called before every run of this implementation (e.g. to set kernel configurations).
    prepare: Callable[[], None] | None = None
    note: str = ""


def _naive(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _parse_spec(spec: str) -> tuple[str, str | None]:
    base, _, param = spec.partition("@")
    return base, (param or None)


_TRITON_KNOBS = ("MIN_SPLITS", "DZ_GROUP", "SPLIT_FASTEST", "GEMM_BUFFER_BYTES", "ACC_BYTES")
_TRITON_KNOB_DEFAULTS: dict = {}


def resolve_impl(spec: str, device: torch.device, token_chunk=None, vocab_chunk=None) -> tuple[Impl | None, str]:
    """The :class:`Impl` of ``spec`` on ``device``, or ``(None, reason)`` when it cannot run here."""
    base, param = _parse_spec(spec)
    if base not in ALL_IMPLS:
        raise ValueError(f"--impls: unknown implementation {spec!r}; choose from {ALL_IMPLS} (with @params)")
    if base == "naive":
        return Impl(spec, _naive, fwdbwd_flop_factor=6, note="materialized logits"), ""
    if base == "trl_chunked":
        try:
            from trl.kernels import ChunkedLogProbFunction
        except Exception as exc:  # pragma: no cover - TRL is a dependency
            return None, f"trl.kernels.ChunkedLogProbFunction not importable: {exc}"
        chunk = int(param) if param else TRL_CHUNK_SIZE

        def trl_fn(hidden, weight, targets):
            lp, ent, *_ = ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, chunk, None, 1.0, ("entropy",)
            )
            return lp, ent

        return Impl(spec, trl_fn, note=f"chunk_size={chunk}"), ""
    if base == "ours_chunked":
        from llm_entreg.ops.chunked import TOKEN_CHUNK, VOCAB_CHUNK, chunked_linear_token_stats

        tc, vc = token_chunk, vocab_chunk
        if param:
            try:
                tc_s, vc_s = param.lower().split("x")
                tc, vc = int(tc_s), int(vc_s)
            except ValueError:
                raise ValueError(f"--impls: {spec!r}: expected ours_chunked@<token_chunk>x<vocab_chunk>") from None
        kind = "cuda" if device.type == "cuda" else "cpu"
        note = f"token_chunk={tc or TOKEN_CHUNK[kind]}, vocab_chunk={vc or VOCAB_CHUNK[kind]}"
        if tc is None and vc is None:

            def ours_fn(hidden, weight, targets):
                return linear_logprob_and_entropy(hidden, weight, targets, backend="chunked")
        else:

            def ours_fn(hidden, weight, targets):
                st = chunked_linear_token_stats(hidden, weight, None, targets, 1.0, -100, (), None, tc, vc)
                return st.logprobs, st.entropy

        return Impl(spec, ours_fn, note=note), ""
    if base == "ours_torch":

        def torch_fn(hidden, weight, targets):
            return linear_logprob_and_entropy(hidden, weight, targets, backend="torch")

        return Impl(spec, torch_fn, fwdbwd_flop_factor=6, note="materializing reference backend"), ""
    if base == "ours_triton":
        try:
            from llm_entreg.ops import triton_available

            if not triton_available():
                return None, "triton not importable"
            from llm_entreg.ops import triton_linear
        except Exception as exc:
            return None, f"llm_entreg.ops.triton_linear not importable: {exc}"

        fwd_cfg = dz_cfg = None
        # the module's own values, read once: an earlier implementation's prepare() changes them (bench_sizes resolves
        # the implementations again at every point)
        if not _TRITON_KNOB_DEFAULTS:
            _TRITON_KNOB_DEFAULTS.update({k: getattr(triton_linear, k) for k in _TRITON_KNOBS})
        knobs = dict(_TRITON_KNOB_DEFAULTS)
        defaults = dict(knobs)
        mode = None  # the device default (head_mode); a forced tile configuration or split/group knob means "tiles"
        if param:
            cfg_part, *extra = param.split("+")
            parts = cfg_part.split("/") if cfg_part else []
            if len(parts) > 2:
                raise ValueError(f"--impls: {spec!r}: expected ours_triton@FWD[/DZ][+splitsN][+groupN]")
            try:
                if parts:
                    fwd_cfg = triton_linear.KernelConfig.parse(parts[0])
                    dz_cfg = triton_linear.KernelConfig.parse(parts[-1])
                for knob in extra:
                    if knob in triton_linear.HEAD_MODES:
                        mode = knob
                        continue
                    if knob.startswith("buf") and knob[3:].isdigit() and int(knob[3:]) > 0:
                        knobs["GEMM_BUFFER_BYTES"] = int(knob[3:]) * 2**20
                        mode = mode or "gemm"
                        continue
                    if knob.startswith("acc") and knob[3:].isdigit() and int(knob[3:]) > 0:
                        knobs["ACC_BYTES"] = int(knob[3:]) * 2**20
                        continue
                    if knob == "tokenfirst":
                        knobs["SPLIT_FASTEST"] = False
                        continue
                    name = "MIN_SPLITS" if knob.startswith("splits") else "DZ_GROUP" if knob.startswith("group") else None
                    value = knob.removeprefix("splits").removeprefix("group")
                    if name is None or not value.isdigit() or int(value) < 1:
                        raise ValueError(f"unknown knob {knob!r} (splitsN, groupN with N >= 1, tokenfirst, tiles, "
                                         "gemm)")
                    knobs[name] = int(value)
            except ValueError as exc:
                raise ValueError(f"--impls: {spec!r}: {exc}") from None
            tiles_knobs = parts or any(knobs[k] != defaults[k] for k in ("MIN_SPLITS", "DZ_GROUP", "SPLIT_FASTEST"))
            if mode == "gemm" and tiles_knobs:
                raise ValueError(f"--impls: {spec!r}: tile configurations and splitsN/groupN/tokenfirst apply to the "
                                 "tiles mode, not +gemm")
            if mode is None and tiles_knobs:
                mode = "tiles"
        if device.type != "cuda":
            return None, "CUDA only (on the CPU Triton runs only under TRITON_INTERPRET=1, far too slow to time)"

        def prepare():
            triton_linear.set_head_mode(mode)
            triton_linear.set_kernel_config("fwd", fwd_cfg)
            triton_linear.set_kernel_config("dz", dz_cfg)
            for name, value in knobs.items():
                setattr(triton_linear, name, value)

        def triton_fn(hidden, weight, targets):
            return linear_logprob_and_entropy(hidden, weight, targets, backend="triton")

        dev = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        cfgs = {k: str(triton_linear.kernel_config(k, dev, torch.bfloat16)) for k in ("fwd", "dz")}
        if fwd_cfg is not None:
            cfgs = {"fwd": str(fwd_cfg), "dz": str(dz_cfg)}
        shown = mode or triton_linear.head_mode(dev)
        if shown == "gemm":
            note = (f"Triton LM head, gemm mode: cuBLAS fp32 logits into a "
                    f"{knobs['GEMM_BUFFER_BYTES'] / 2**20:g} MiB buffer + Triton row kernels, fp32 accumulator "
                    f"<= {knobs['ACC_BYTES'] / 2**20:g} MiB")
        else:
            note = (f"fused Triton LM head, tiles mode (fwd {cfgs['fwd']}, dz {cfgs['dz']}"
                    f"{'' if fwd_cfg else ' for bf16'}"
                    + "".join(f", {k}={v}" for k, v in knobs.items() if v != defaults[k]) + ")")
        return Impl(spec, triton_fn, prepare=prepare, note=note), ""
    if base in ("ours_fused_loss", "ours_fused_loss_chunked"):
        from llm_entreg.ops import fused_linear_loss
        from llm_entreg.ops.fused_loss import CHUNK_BUDGET_BYTES, CUDA_CHUNK_BUDGET_BYTES

        if base == "ours_fused_loss":
            fl_backend = "triton" if device.type == "cuda" else "chunked"
        else:
            fl_backend = "chunked"
        budget = int(float(param) * 2**20) if param else (
            CUDA_CHUNK_BUDGET_BYTES if device.type == "cuda" else CHUNK_BUDGET_BYTES)

        def fl_fn(hidden, weight, targets):
            zero = lambda lp, h, rows: torch.zeros_like(lp)  # noqa: E731 - forward only: statistics
            _, stats = fused_linear_loss(hidden, weight, targets, zero, backend=fl_backend,
                                         chunk_budget_bytes=budget)
            return stats.logprobs, stats.entropy

        def fl_loss(hidden, weight, targets, g_lp, g_h):
            g1, g2 = g_lp.detach().float(), g_h.detach().float()

            def loss_fn(lp, h, rows):
                return g1[rows].to(lp.dtype) * lp + g2[rows].to(h.dtype) * h

            loss, _ = fused_linear_loss(hidden, weight, targets, loss_fn, backend=fl_backend,
                                        chunk_budget_bytes=budget)
            return loss

        return Impl(spec, fl_fn, fwdbwd_flop_factor=6, loss_fn=fl_loss, loss_is_reference=True,
                    note=f"loss-fused LM head ({fl_backend}, chunk budget {budget / 2**20:g} MiB)"), ""
    if base in ("liger_scaled", "liger_scaled_fallback"):
        try:
            from liger_kernel.ops import fused_linear_scaled_cross_entropy as lsce
        except Exception as exc:
            return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
        if device.type != "cuda":
            return None, "benchmarked on CUDA only"
        if base == "liger_scaled":
            try:
                fn_cls = lsce._resolve_implementation(device if device.index is not None else torch.device("cuda", 0))
            except Exception as exc:
                return None, f"Liger's sm90 kernel not importable ({type(exc).__name__}: {str(exc)[:160]})"
        else:
            fn_cls = lsce._FusedLinearPPOFallbackFunction
        fallback = fn_cls is lsce._FusedLinearPPOFallbackFunction

        def scaled_fn(hidden, weight, targets):
            if fallback:
                nll, ent = fn_cls.apply(hidden, weight, targets, 1.0, -100, True)
            else:
                nll, ent = fn_cls.apply(hidden, weight, targets, 1.0, -100, 1, True)
            return -nll.float(), ent.float()

        return Impl(spec, scaled_fn, note=f"Liger fused linear scaled CE, {fn_cls.__name__}"), ""
    # liger
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:
        return None, f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    if device.type != "cuda":
        return None, "Liger's kernels are Triton/CUDA only"

    def _loss(out):
        return out[0] if isinstance(out, tuple) else out

    def liger_fn(hidden, weight, targets):
        loss = _loss(liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none"))
        return -loss.float(), None

    def liger_loss(hidden, weight, targets, g_lp, g_h):
        # Liger computes the input gradients inside its forward and scales them by a scalar in its backward,
        # so a per-token upstream gradient is not supported: a summed CE loss is the closest equivalent.
        return _loss(liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum"))

    return (
        Impl(spec, liger_fn, fwdbwd_flop_factor=6, has_entropy=False, loss_fn=liger_loss,
             note="log-prob only (no entropy); fwd+bwd on reduction='sum'"),
        "",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, timing, memory
# ----------------------------------------------------------------------------------------------------------------------
def make_inputs(n: int, d: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    """hidden ~ N(0, 1), weight ~ N(0, (2/sqrt d)^2) (logits std ~2), targets uniform, upstream grads ~ N(0, 1)."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=gen_device)
    weight = torch.randn(vocab, d, generator=gen, device=gen_device).mul_(2.0 / math.sqrt(d))
    targets = torch.randint(0, vocab, (n,), generator=gen, device=gen_device)
    g_lp = torch.randn(n, generator=gen, device=gen_device)
    g_h = torch.randn(n, generator=gen, device=gen_device)
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(True)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(True)
    return hidden, weight, targets.to(device), g_lp.to(device), g_h.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(impl: Impl, hidden, weight, targets, g_lp, g_h):
    if impl.prepare is not None:
        impl.prepare()
    if impl.loss_fn is not None:
        return impl.loss_fn(hidden, weight, targets, g_lp, g_h)
    lp, ent = impl.fn(hidden, weight, targets)
    return (g_lp * lp).sum() + (g_h * ent).sum()


def _run_fwd(impl: Impl, inputs) -> None:
    hidden, weight, targets, _, _ = inputs
    if impl.prepare is not None:
        impl.prepare()
    with torch.no_grad():
        out = impl.fn(hidden, weight, targets)
    del out


def _run_fwdbwd(impl: Impl, inputs) -> None:
    hidden, weight, targets, g_lp, g_h = inputs
    hidden.grad = None
    weight.grad = None
    _loss(impl, hidden, weight, targets, g_lp, g_h).backward()


def _time(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float]) -> dict:
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def _time_all(
    runners: dict, warmup: int, repeats: int, device: torch.device, order: str, inputs, progress=None
) -> dict:
    """Times every runner -> ``{spec: (wall times, process CPU times)}``; ``interleaved`` runs repeat r of every implementation before repeat r+1 of any, so
    load that drifts over the run (a shared machine) hits all implementations alike. Errors come back as strings."""

    def clear():
        inputs[0].grad = None
        inputs[1].grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    out: dict = {}
    live = dict(runners)
    cpu_times: dict = {}

    def attempt(spec, fn, i):
        try:
            c0 = time.process_time()
            t = _time(fn, 0, 1, device)[0]
            if i >= warmup:
                cpu_times.setdefault(spec, []).append(time.process_time() - c0)
            if progress is not None:
                progress(f"    {spec:<22} {'warmup' if i < warmup else f'repeat {i - warmup + 1}/{repeats}'}: "
                         f"{t * 1e3:,.1f} ms")
            return t
        except Exception as exc:  # noqa: BLE001 - e.g. naive running out of memory on a GPU
            out[spec] = f"{type(exc).__name__}: {str(exc)[:300]}"
            live.pop(spec, None)
            return None
        finally:
            clear()

    if order == "sequential":
        for spec, fn in runners.items():
            times = []
            for i in range(warmup + repeats):
                t = attempt(spec, fn, i)
                if t is None:
                    break
                if i >= warmup:
                    times.append(t)
            else:
                out[spec] = (times, cpu_times[spec])
        return out
    times = {spec: [] for spec in runners}
    for i in range(warmup + repeats):
        for spec, fn in list(live.items()):
            t = attempt(spec, fn, i)
            if t is not None and i >= warmup:
                times[spec].append(t)
    for spec in live:
        out[spec] = (times[spec], cpu_times.get(spec, []))
    return out


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _grad_bytes(hidden, weight) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None)


def _cpu_memory_child(cfg: dict) -> dict:
    """In a fresh process: peak RSS of one call of one implementation (``mode`` = fwd or fwdbwd), in bytes."""
    device = torch.device("cpu")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dtype = DTYPES[cfg["dtype"]]
    impl, reason = resolve_impl(cfg["impl"], device, cfg.get("token_chunk"), cfg.get("vocab_chunk"))
    if impl is None:
        return {"status": "skipped", "reason": reason}
    # Tiny warmup: loads the libraries and kernels the call needs, allocates next to nothing.
    tiny = make_inputs(8, min(cfg["d"], 16), min(cfg["vocab"], 97), dtype, device, 1)
    _run_fwdbwd(impl, tiny)
    _run_fwd(impl, tiny)
    del tiny
    inputs = make_inputs(cfg["n"], cfg["d"], cfg["vocab"], dtype, device, cfg["seed"])
    gc.collect()
    _malloc_trim()
    reset = _reset_peak_rss()
    before_rss = _proc_status_kib("VmRSS")
    if not reset or before_rss is None:  # no clear_refs: ru_maxrss is the best we have (a lower bound of the extra)
        import resource

        before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cfg["mode"] == "fwd":
        _run_fwd(impl, inputs)
    else:
        _run_fwdbwd(impl, inputs)
    peak = _proc_status_kib("VmHWM") if reset else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_bytes = _grad_bytes(inputs[0], inputs[1])
    extra = max(peak - before_rss, 0) * 1024
    return {
        "status": "ok",
        "method": "VmHWM after clear_refs" if reset else "ru_maxrss (peak not resettable)",
        "baseline_rss_bytes": before_rss * 1024,
        "peak_rss_bytes": peak * 1024,
        "peak_extra_bytes": extra,
        "grad_bytes": grad_bytes,
        "peak_extra_excl_grads_bytes": max(extra - grad_bytes, 0),
    }


def _cpu_memory(cfg: dict, timeout: float) -> dict:
    """Runs :func:`_cpu_memory_child` in a fresh interpreter (torch has no CPU allocator statistics)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "llm_entreg.bench", "--_child", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"memory subprocess timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_CHILD_TAG):
            return json.loads(line[len(_CHILD_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "reason": f"memory subprocess rc={proc.returncode}: {' | '.join(tail)}"}


def _cuda_memory(impl: Impl, inputs, mode: str, device: torch.device) -> dict:
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = None
    weight.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if mode == "fwd":
        _run_fwd(impl, inputs)
    else:
        _run_fwdbwd(impl, inputs)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    grad_bytes = _grad_bytes(hidden, weight)
    hidden.grad = None
    weight.grad = None
    return {
        "status": "ok",
        "method": "torch.cuda.max_memory_allocated - baseline",
        "peak_extra_bytes": extra,
        "grad_bytes": grad_bytes,
        "peak_extra_excl_grads_bytes": max(extra - grad_bytes, 0),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Correctness guard
# ----------------------------------------------------------------------------------------------------------------------
def _check(impl: Impl, inputs, k: int, dtype: torch.dtype) -> dict:
    """Forward outputs and grads of hidden/weight on the first ``k`` tokens vs a float64 naive reference."""
    hidden, weight, targets, g_lp, g_h = inputs
    h = hidden.detach()[:k].clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    t, g1, g2 = targets[:k], g_lp[:k], g_h[:k]
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref_lp, ref_h = _naive(h64, w64, t)
    ((g1.double() * ref_lp).sum() + (g2.double() * ref_h).sum()).backward()
    tol = TOL[dtype]
    out: dict = {"tokens": k, "tolerance": tol}
    if impl.prepare is not None:
        impl.prepare()
    with torch.no_grad():
        lp, ent = impl.fn(h, w, t)
    out["max_abs_diff_logprobs"] = float((lp.double() - ref_lp.detach()).abs().max())
    out["max_abs_diff_entropy"] = None if ent is None else float((ent.double() - ref_h.detach()).abs().max())
    out["grad_rel_err_hidden"] = out["grad_rel_err_weight"] = None
    if impl.loss_fn is None or impl.loss_is_reference:
        _loss(impl, h, w, t, g1, g2).backward()
        out["grad_rel_err_hidden"] = _rel_err(h.grad, h64.grad)
        out["grad_rel_err_weight"] = _rel_err(w.grad, w64.grad)
    out["passed"] = _passed(out, tol)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` the reference)."""
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def _passed(check: dict, tol: dict) -> bool:
    """A check's verdict: every figure it holds is finite and within ``tol`` (``None``: not measured -- the entropy
    of a log-prob-only implementation, the gradients of one whose loss is not the benchmark's)."""
    limits = {"max_abs_diff_logprobs": tol["logprobs"], "max_abs_diff_entropy": tol["entropy"],
              "grad_rel_err_hidden": tol["grad_rel"], "grad_rel_err_weight": tol["grad_rel"]}
    return all(check[k] is None or (math.isfinite(check[k]) and check[k] <= lim) for k, lim in limits.items())


def sampled_reference(inputs, rows: torch.Tensor, cols: torch.Tensor, chunk: int = 1024) -> dict:
    """Float64 reference at full size on sampled token rows and vocabulary rows.

    Statistics ``lse``/``H`` of every token (chunks of ``chunk`` tokens, fp64 logits), then for the token ``rows``
    their log-probs, entropies and ``grad_hidden`` rows, and for the vocabulary ``cols`` the ``grad_weight`` rows
    ``sum_t dz[t, c] h_t`` over all tokens. The loss is the benchmark's ``sum g_lp logp + g_H H``; the inputs are
    upcast from their own dtype, so the products are exact and only the implementation's rounding shows.
    """
    hidden, weight, targets, g_lp, g_h = inputs
    h64, w64 = hidden.detach().double(), weight.detach().double()
    g1, g2 = g_lp.double(), g_h.double()
    n = h64.shape[0]
    lse = torch.empty(n, dtype=torch.float64, device=h64.device)
    ent = torch.empty_like(lse)
    for r0 in range(0, n, chunk):
        z = h64[r0 : r0 + chunk] @ w64.t()
        lse_c = torch.logsumexp(z, 1)
        p = torch.exp(z - lse_c[:, None])
        lse[r0 : r0 + chunk] = lse_c
        ent[r0 : r0 + chunk] = lse_c - (p * z).sum(1)
        del z, p

    def dz_of(z, lse_, ent_, onehot, a, b):
        p = torch.exp(z - lse_[:, None])
        return a[:, None] * (onehot - p) - b[:, None] * p * (z - lse_[:, None] + ent_[:, None])

    z_r = h64[rows] @ w64.t()
    t_r = targets[rows]
    lp_r = z_r.gather(1, t_r[:, None]).squeeze(1) - lse[rows]
    onehot_r = torch.zeros_like(z_r).scatter_(1, t_r[:, None], 1.0)
    dh_r = dz_of(z_r, lse[rows], ent[rows], onehot_r, g1[rows], g2[rows]) @ w64
    z_c = h64 @ w64[cols].t()
    onehot_c = (targets[:, None] == cols[None, :]).double()
    dw_c = dz_of(z_c, lse, ent, onehot_c, g1, g2).t() @ h64
    return {"logprobs": lp_r, "entropy": ent[rows], "grad_hidden": dh_r, "grad_weight": dw_c}


def check_sampled(impl: Impl, inputs, ref: dict, rows, cols, dtype: torch.dtype) -> dict:
    """Run ``impl`` forward and forward+backward at full size; compare the sampled rows with :func:`sampled_reference`."""
    hidden, weight, targets = inputs[:3]
    if impl.prepare is not None:
        impl.prepare()
    with torch.no_grad():
        lp, ent = impl.fn(hidden, weight, targets)
    out: dict = {"token_rows": int(rows.numel()), "vocab_rows": int(cols.numel())}
    out["max_abs_diff_logprobs"] = float((lp[rows].double() - ref["logprobs"]).abs().max())
    out["max_abs_diff_entropy"] = None if ent is None else float((ent[rows].double() - ref["entropy"]).abs().max())
    del lp, ent
    out["grad_rel_err_hidden"] = out["grad_rel_err_weight"] = None
    if impl.loss_fn is None or impl.loss_is_reference:
        _run_fwdbwd(impl, inputs)
        out["grad_rel_err_hidden"] = _rel_err(hidden.grad[rows], ref["grad_hidden"])
        out["grad_rel_err_weight"] = _rel_err(weight.grad[cols], ref["grad_weight"])
        hidden.grad = weight.grad = None
    out["passed"] = _passed(out, TOL[dtype])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Matmul reference rate
# ----------------------------------------------------------------------------------------------------------------------
def _mm_rate(n, d, vocab, dtype, device, warmup, repeats) -> dict:
    """FLOP/s of ``[n, d] @ [d, min(vocab, 32768)]`` in ``dtype``: the tile GEMM the chunked paths run."""
    v = min(vocab, TRL_CHUNK_SIZE)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    a = torch.randn(n, d, device=gen_device).to(device=device, dtype=dtype)
    b = torch.randn(v, d, device=gen_device).to(device=device, dtype=dtype)
    c = torch.empty(n, v, device=device, dtype=dtype)
    times = _time(lambda: torch.mm(a, b.t(), out=c), max(warmup, 1), max(repeats, 3), device)
    med = statistics.median(times)
    return {"shape": [n, d, v], "dtype": str(dtype), "median_s": med, "flops_per_s": 2.0 * n * d * v / med}


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("trl", "transformers", "triton", "liger_kernel"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "?")
        except Exception:
            v[mod] = None
    return v


def _device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        info["name"] = f"{info['cpu_model']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "bench_entropy.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time and measure the memory of fused log-prob + entropy LM heads (ours vs TRL vs naive).",
    )
    p.add_argument("--n", type=int, default=None, help="tokens N (default 2048; --quick: 128)")
    p.add_argument("--d", type=int, default=None, help="hidden size d (default 512; --quick: 64)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 151936; --quick: 3001)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (default fp32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup calls (default 1)")
    p.add_argument("--impls", default=DEFAULT_IMPLS,
                   help=f"comma list from {ALL_IMPLS}; ours_chunked@TCxVC and trl_chunked@C set tile sizes "
                        f"(default {DEFAULT_IMPLS}; implementations that cannot run here are listed as skipped)")
    p.add_argument("--token-chunk", type=int, default=None, help="token tile of plain ours_chunked (default: chunked.py)")
    p.add_argument("--vocab-chunk", type=int, default=None, help="vocab tile of plain ours_chunked (default: chunked.py)")
    p.add_argument("--out", default="bench_out", help="directory for the .json and .md results (default bench_out)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: torch's; --quick: 1)")
    p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved (default): repeat r of every implementation before repeat r+1 of any, so a "
                        "load change on a shared machine hits all alike; sequential: all repeats of one, then the next")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-tokens", type=int, default=64, help="tokens of the correctness-guard slice (default 64)")
    p.add_argument("--check-sampled", type=int, default=0, metavar="K",
                   help="also check every implementation AT FULL SIZE on K sampled token rows and K vocabulary rows "
                        "against a float64 reference (default 0: off)")
    p.add_argument("--memory", choices=("both", "fwdbwd", "off"), default=None,
                   help="peak-memory measurements: fwd and fwd+bwd, fwd+bwd only, or none "
                        "(default both; --quick: fwdbwd). On the CPU each is a fresh subprocess.")
    p.add_argument("--mem-impls", default=None,
                   help="comma list: measure the memory of these implementations only (default: every one timed)")
    p.add_argument("--mem-jobs", type=int, default=1,
                   help="CPU memory subprocesses run at once (default 1; each measures its own RSS, so >1 only "
                        "costs RAM, not accuracy)")
    p.add_argument("--mem-timeout", type=float, default=1800.0, help="seconds per CPU memory subprocess")
    p.add_argument("--quick", action="store_true", help="tiny size that runs in seconds on the CPU (README / tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every timed call as it finishes")
    p.add_argument("--tag", default=None, help="suffix of the output file names")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the markdown (and ratios) of a saved result JSON, next to it")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p


def _finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    full = dict(n=2048, d=512, vocab=151936, repeats=5, warmup=1)
    defaults = QUICK if args.quick else full
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory is None:
        args.memory = "fwdbwd" if args.quick else "both"
    if args.quick and args.threads is None:
        # Tiny ops: one thread avoids OpenMP barrier stalls, which dominate on a shared (oversubscribed) CPU.
        args.threads = 1
    if min(args.n, args.d, args.vocab, args.repeats) < 1 or args.warmup < 0:
        raise SystemExit("--n, --d, --vocab, --repeats must be >= 1 and --warmup >= 0")
    return args


def _mib(b):
    return None if b is None else b / 2**20


def run_bench(args: argparse.Namespace, argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs the benchmark of ``args`` (from :func:`build_parser`), writes ``<out>/<name>.json`` and ``.md``."""
    args = _finalize_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    n, d, vocab = args.n, args.d, args.vocab
    started = _dt.datetime.now(_dt.timezone.utc)
    command = "python scripts/bench_entropy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    info = _device_info(device)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    log(f"# bench: N={n} d={d} V={vocab} {args.dtype} on {info['name']}  ({started:%Y-%m-%d %H:%M UTC})")

    inputs = make_inputs(n, d, vocab, dtype, device, args.seed)
    specs = [s.strip() for s in args.impls.split(",") if s.strip()]
    results: dict[str, dict] = {}
    impls: dict[str, Impl] = {}
    for spec in specs:
        impl, reason = resolve_impl(spec, device, args.token_chunk, args.vocab_chunk)
        if impl is None:
            results[spec] = {"status": "skipped", "reason": reason}
            log(f"  {spec:<24} skipped: {reason}")
            continue
        impls[spec] = impl
        results[spec] = {"status": "ok", "note": impl.note, "has_entropy": impl.has_entropy}

    # CPU peak memory: fresh subprocesses, started now so that they overlap the (untimed) correctness checks; they
    # are all finished before anything is timed, so they never compete with a timed call.
    mem_modes = {"both": ("fwd", "fwdbwd"), "fwdbwd": ("fwdbwd",), "off": ()}[args.memory]
    wanted = None if args.mem_impls is None else {s.strip() for s in args.mem_impls.split(",") if s.strip()}
    mem_specs = [spec for spec in impls if wanted is None or spec in wanted]
    cpu_mem = None
    if device.type != "cuda" and mem_modes:
        from concurrent.futures import ThreadPoolExecutor

        def child(job):
            spec, mode = job
            cfg = dict(impl=spec, mode=mode, n=n, d=d, vocab=vocab, dtype=args.dtype, seed=args.seed,
                       threads=torch.get_num_threads(), token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk)
            return _cpu_memory(cfg, args.mem_timeout)

        pool = ThreadPoolExecutor(max_workers=max(1, args.mem_jobs))
        cpu_mem = {(spec, mode): pool.submit(child, (spec, mode)) for spec in mem_specs for mode in mem_modes}
        pool.shutdown(wait=False)

    # Correctness guard first: a broken implementation is never timed.
    k = min(n, args.check_tokens)
    for spec, impl in list(impls.items()):
        try:
            chk = _check(impl, inputs, k, dtype)
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            chk = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        results[spec]["check"] = chk
        ent = chk.get("max_abs_diff_entropy")
        log(f"  {spec:<24} check {'PASS' if chk['passed'] else 'FAIL'}: "
            f"max|dlogp|={chk.get('max_abs_diff_logprobs', float('nan')):.2e} "
            f"max|dH|={'n/a' if ent is None else f'{ent:.2e}'} "
            f"grad rel h/w={chk.get('grad_rel_err_hidden')}/{chk.get('grad_rel_err_weight')}"
            + (f" {chk['error']}" if "error" in chk else ""))
        if not chk["passed"]:
            results[spec]["status"] = "check_failed"
            del impls[spec]

    if args.check_sampled and impls:
        gen = torch.Generator().manual_seed(args.seed + 1)
        rows = torch.randperm(n, generator=gen)[: args.check_sampled].to(device)
        cols = torch.randperm(vocab, generator=gen)[: args.check_sampled].to(device)
        cols[0] = int(inputs[2][rows[0]])  # one sampled vocabulary row is some sampled token's target
        ref = sampled_reference(inputs, rows, cols)
        for spec, impl in list(impls.items()):
            try:
                chk = check_sampled(impl, inputs, ref, rows, cols, dtype)
            except Exception as exc:  # noqa: BLE001
                chk = {"passed": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                inputs[0].grad = inputs[1].grad = None
            results[spec]["check_sampled"] = chk
            log(f"  {spec:<24} full-size sampled check {'PASS' if chk['passed'] else 'FAIL'}: "
                f"max|dlogp|={chk.get('max_abs_diff_logprobs')} max|dH|={chk.get('max_abs_diff_entropy')} "
                f"grad rel h/w={chk.get('grad_rel_err_hidden')}/{chk.get('grad_rel_err_weight')}"
                + (f" {chk['error']}" if "error" in chk else ""))
            if not chk["passed"]:
                results[spec]["status"] = "check_failed"
                del impls[spec]
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    jobs = [(spec, mode) for spec in mem_specs if spec in impls for mode in mem_modes]
    for spec in impls:
        results[spec]["memory"] = {}
    if cpu_mem is not None:
        for (spec, mode), fut in cpu_mem.items():
            mem = fut.result()
            if spec in impls:  # an implementation that failed its check gets no figures
                results[spec]["memory"][mode] = mem

    mm = _mm_rate(n, d, vocab, dtype, device, args.warmup, args.repeats)
    log(f"  matmul reference {mm['shape']} {args.dtype}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s")

    nominal = float(n) * d * vocab
    for mode in ("fwd", "fwdbwd"):
        runners = {
            spec: (lambda impl=impl: _run_fwd(impl, inputs)) if mode == "fwd" else (lambda impl=impl: _run_fwdbwd(impl, inputs))
            for spec, impl in impls.items()
        }
        if args.verbose:
            log(f"  timing {mode} ...")
        timed = _time_all(runners, args.warmup, args.repeats, device, args.order, inputs,
                          progress=log if args.verbose else None)
        for spec, value in timed.items():
            res = results[spec]
            if isinstance(value, str):
                res[mode] = {"error": value}
                res["status"] = "error"
                continue
            res[mode] = _summary(value[0])
            # Process CPU time (all threads): less sensitive than wall time to other jobs on a shared machine.
            res[mode]["cpu_times_s"] = value[1]
            res[mode]["cpu_median_s"] = statistics.median(value[1]) if value[1] else None
            factor = 2 if mode == "fwd" else impls[spec].fwdbwd_flop_factor
            flops = factor * nominal / res[mode]["median_s"]
            res[mode]["flop_factor"] = factor
            res[mode]["tflops"] = flops / 1e12
            res[mode]["fraction_of_mm"] = flops / mm["flops_per_s"]
    for spec in impls:
        log(f"  {spec:<24} fwd {_fmt_time(results[spec].get('fwd'))}  fwd+bwd {_fmt_time(results[spec].get('fwdbwd'))}")

    # GPU peak memory: allocator statistics in this process, after the timings.
    if device.type == "cuda":
        for spec, mode in jobs:
            try:
                mem = _cuda_memory(impls[spec], inputs, mode, device)
            except Exception as exc:  # noqa: BLE001
                mem = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
                inputs[0].grad = inputs[1].grad = None
                torch.cuda.empty_cache()
            results[spec]["memory"][mode] = mem
    for spec, mode in jobs:
        mem = results[spec]["memory"][mode]
        if mem.get("status") == "ok":
            log(f"  {spec:<24} {mode:<6} peak extra {_mib(mem['peak_extra_bytes']):,.1f} MiB "
                f"(excl. grads {_mib(mem['peak_extra_excl_grads_bytes']):,.1f} MiB)")
        else:
            log(f"  {spec:<24} {mode:<6} memory: {mem.get('reason')}")

    ratios = _ratios(results)
    finished = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "meta": {
            "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "finished_utc": finished.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
            "hostname": platform.node(),
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            **_versions(),
        },
        "device": info,
        "config": {
            "n": n, "d": d, "vocab": vocab, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
            "impls": specs, "mem_impls": args.mem_impls, "order": args.order, "seed": args.seed, "check_tokens": k,
            "check_sampled": args.check_sampled, "memory": args.memory, "quick": args.quick,
            "token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk,
            "loss": "(g_lp * logp).sum() + (g_H * H).sum(), g ~ N(0,1) per token; grads to hidden and weight",
            "flops": "fwd 2NdV; fwd+bwd 8NdV with a recomputing backward, 6NdV when the logits are kept",
        },
        "args": {k_: v for k_, v in vars(args).items() if not k_.startswith("_")},
        "matmul_reference": mm,
        "results": results,
        "ratios": ratios,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_{device.type}_{n}x{d}x{vocab}_{args.dtype}" + (f"_{args.tag}" if args.tag else "")
    md = render_markdown(report)
    report["files"] = {"json": str(out_dir / f"{name}.json"), "markdown": str(out_dir / f"{name}.md")}
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(md)
    log("")
    log(md)
    log(f"wrote {report['files']['json']} and {report['files']['markdown']}")
    _restore_triton_defaults()
    return report


def _restore_triton_defaults() -> None:
    """Undo what the ``ours_triton@...`` implementations' ``prepare()`` set (mode, tile configurations, knobs)."""
    if not _TRITON_KNOB_DEFAULTS:
        return
    from llm_entreg.ops import triton_linear

    triton_linear.set_head_mode(None)
    for kernel in triton_linear.KERNELS:
        triton_linear.set_kernel_config(kernel, None)
    for name, value in _TRITON_KNOB_DEFAULTS.items():
        setattr(triton_linear, name, value)


def _median(res: dict, mode: str, key: str = "median_s"):
    return res.get(mode, {}).get(key) if isinstance(res.get(mode), dict) else None


def _mem(res: dict, mode: str, key: str = "peak_extra_bytes"):
    mem = res.get("memory", {}).get(mode, {})
    return mem.get(key) if mem.get("status") == "ok" else None


def _ratios(results: dict) -> dict:
    """Time ratios vs ``trl_chunked`` and memory ratios vs ``naive``, all from this run."""

    def div(a, b):
        return None if a is None or b in (None, 0) else a / b

    trl = results.get("trl_chunked", {})
    naive = results.get("naive", {})
    out = {}
    for spec, res in results.items():
        if res.get("status") != "ok":
            continue
        out[spec] = {
            "fwd_time_vs_trl_chunked": div(_median(res, "fwd"), _median(trl, "fwd")),
            "fwdbwd_time_vs_trl_chunked": div(_median(res, "fwdbwd"), _median(trl, "fwdbwd")),
            # On a shared machine the fastest repeat and the process CPU time are less disturbed by other jobs.
            "fwd_min_time_vs_trl_chunked": div(_median(res, "fwd", "min_s"), _median(trl, "fwd", "min_s")),
            "fwdbwd_min_time_vs_trl_chunked": div(_median(res, "fwdbwd", "min_s"), _median(trl, "fwdbwd", "min_s")),
            "fwdbwd_cpu_time_vs_trl_chunked": div(
                _median(res, "fwdbwd", "cpu_median_s"), _median(trl, "fwdbwd", "cpu_median_s")
            ),
            "fwd_time_vs_naive": div(_median(res, "fwd"), _median(naive, "fwd")),
            "fwdbwd_time_vs_naive": div(_median(res, "fwdbwd"), _median(naive, "fwdbwd")),
            "fwd_mem_vs_naive": div(_mem(res, "fwd"), _mem(naive, "fwd")),
            "fwdbwd_mem_vs_naive": div(_mem(res, "fwdbwd"), _mem(naive, "fwdbwd")),
            "fwdbwd_mem_excl_grads_vs_naive": div(
                _mem(res, "fwdbwd", "peak_extra_excl_grads_bytes"), _mem(naive, "fwdbwd", "peak_extra_excl_grads_bytes")
            ),
        }
    return out


def _fmt_time(s: dict | None) -> str:
    if not s:
        return "-"
    if "error" in s:
        return "error"
    return f"{s['median_s'] * 1e3:,.1f} ({s['min_s'] * 1e3:,.1f}–{s['max_s'] * 1e3:,.1f})"


def _fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _fmt_load(load) -> str:
    return "n/a" if not load else ", ".join(f"{x:.2f}" for x in load)


def render_markdown(report: dict) -> str:
    cfg, dev, mm = report["config"], report["device"], report["matmul_reference"]
    lines = [
        f"### N={cfg['n']}, d={cfg['d']}, V={cfg['vocab']}, {cfg['dtype']} — {dev['name']}",
        "",
        f"- command: `{report['meta']['command']}`",
        f"- date (UTC): {report['meta']['date_utc']}; torch {report['meta']['torch']}, trl {report['meta']['trl']}; "
        f"median of {cfg['repeats']} timed runs after {cfg['warmup']} warmup ({cfg['order']} order); "
        f"load average at start/end: {_fmt_load(report['meta'].get('loadavg_start'))} / "
        f"{_fmt_load(report['meta'].get('loadavg_end'))}",
        f"- matmul reference `[{mm['shape'][0]}, {mm['shape'][1]}] @ [{mm['shape'][1]}, {mm['shape'][2]}]` "
        f"{cfg['dtype']}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s",
        "",
        "| impl | check max\\|Δlogp\\| / max\\|ΔH\\| / grad rel err | fwd ms median (min–max) "
        "| fwd+bwd ms median (min–max) | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd+bwd excl. grads MiB "
        "| fwd+bwd TFLOP/s | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, res in report["results"].items():
        if res.get("status") == "skipped":
            lines.append(f"| {spec} | skipped: {res['reason']} | | | | | | | |")
            continue
        chk = res.get("check", {})
        grad = [chk.get("grad_rel_err_hidden"), chk.get("grad_rel_err_weight")]
        grad_s = "n/a" if grad[0] is None else f"{max(grad):.1e}"
        check = (f"{'ok' if chk.get('passed') else 'FAILED'} {_fmt(chk.get('max_abs_diff_logprobs'), '.1e')} / "
                 f"{_fmt(chk.get('max_abs_diff_entropy'), '.1e', 'n/a')} / {grad_s}")
        if "error" in chk:
            check += f" ({chk['error'][:80]})"
        fb = res.get("fwdbwd", {})
        lines.append(
            f"| {spec} | {check} | {_fmt_time(res.get('fwd'))} | {_fmt_time(res.get('fwdbwd'))} "
            f"| {_fmt(_mib(_mem(res, 'fwd')), ',.1f')} | {_fmt(_mib(_mem(res, 'fwdbwd')), ',.1f')} "
            f"| {_fmt(_mib(_mem(res, 'fwdbwd', 'peak_extra_excl_grads_bytes')), ',.1f')} "
            f"| {_fmt(fb.get('tflops'), '.3f')} | {_fmt(None if fb.get('fraction_of_mm') is None else 100 * fb['fraction_of_mm'], '.0f')} |"
        )
    lines += ["", "Ratios (same run; time vs `trl_chunked` — of medians unless marked min (fastest repeat) or CPU "
              "(median process CPU time, all threads) — memory vs `naive`):", "",
              "| impl | fwd time / trl | fwd+bwd time / trl | fwd+bwd min time / trl | fwd+bwd CPU time / trl "
              "| fwd+bwd time / naive | fwd mem / naive | fwd+bwd mem / naive | fwd+bwd mem excl. grads / naive |",
              "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in report["ratios"].items():
        lines.append(
            f"| {spec} | {_fmt(r['fwd_time_vs_trl_chunked'], '.3f')} | {_fmt(r['fwdbwd_time_vs_trl_chunked'], '.3f')} "
            f"| {_fmt(r.get('fwdbwd_min_time_vs_trl_chunked'), '.3f')} "
            f"| {_fmt(r.get('fwdbwd_cpu_time_vs_trl_chunked'), '.3f')} "
            f"| {_fmt(r['fwdbwd_time_vs_naive'], '.3f')} | {_fmt(r['fwd_mem_vs_naive'], '.3f')} "
            f"| {_fmt(r['fwdbwd_mem_vs_naive'], '.3f')} | {_fmt(r['fwdbwd_mem_excl_grads_vs_naive'], '.3f')} |"
        )
    sampled = {s_: r["check_sampled"] for s_, r in report["results"].items() if "check_sampled" in r}
    if sampled:
        k_s = next(iter(sampled.values())).get("token_rows", "?")
        lines += ["", f"Full-size check against float64 on {k_s} sampled token rows (log-prob, entropy, grad_hidden "
                  f"rows) and {k_s} sampled vocabulary rows (grad_weight rows):", "",
                  "| impl | max\\|Δlogp\\| | max\\|ΔH\\| | grad_hidden rel err | grad_weight rel err | |",
                  "|---|---|---|---|---|---|"]
        for spec, c in sampled.items():
            lines.append(f"| {spec} | {_fmt(c.get('max_abs_diff_logprobs'), '.1e')} "
                         f"| {_fmt(c.get('max_abs_diff_entropy'), '.1e', 'n/a')} "
                         f"| {_fmt(c.get('grad_rel_err_hidden'), '.1e', 'n/a')} "
                         f"| {_fmt(c.get('grad_rel_err_weight'), '.1e', 'n/a')} "
                         f"| {'ok' if c.get('passed') else 'FAILED ' + c.get('error', '')[:60]} |")
    lines += ["", "Notes: " + "; ".join(f"`{s}`: {r['note']}" for s, r in report["results"].items() if r.get("note")),
              f"FLOPs: {cfg['flops']}. Loss: {cfg['loss']}. Peak extra memory: "
              + ("allocator peak minus the baseline after the inputs exist" if dev["device"].startswith("cuda")
                 else "peak RSS (VmHWM, reset via clear_refs) minus RSS right before the call, one fresh subprocess "
                      "per implementation and mode")
              + "; 'excl. grads' subtracts the bytes of hidden.grad and weight.grad.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._child is not None:
        result = _cpu_memory_child(json.loads(args._child))
        print(_CHILD_TAG + json.dumps(result), flush=True)
        return 0
    if args.render is not None:
        path = Path(args.render)
        report = json.loads(path.read_text())
        report["ratios"] = _ratios(report["results"])
        md = render_markdown(report)
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(md)
        print(md)
        return 0
    report = run_bench(args, argv)

    def failed(res):  # running out of memory (naive on a GPU) is a result, not a failure
        errors = [res.get(m, {}).get("error", "") for m in ("fwd", "fwdbwd")]
        return res.get("status") == "check_failed" or any(e and "OutOfMemory" not in e for e in errors)

    return 1 if any(failed(r) for r in report["results"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
