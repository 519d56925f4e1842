"""Kernel benchmark of the fused LM head (log-prob + entropy, forward and backward): ours vs TRL vs naive vs Liger.

Every implementation (:mod:`llm_entreg.bench.impls`) runs in one process on the same inputs: a correctness guard
against float64 first, then interleaved timings, peak memory and throughput. What is measured and how:
docs/benchmarks.md. Entry points: :func:`build_parser`, :func:`run_bench` (writes ``.json`` + ``.md``), :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .impls import ALL_IMPLS, DEFAULT_IMPLS, TRL_CHUNK_SIZE, Impl, naive_logprob_entropy, resolve_impl
from .report import (STAMP, device_info, fmt_time, head_ratios, loadavg, mib, proc_status_kib, render_head_markdown,
                     reset_peak_rss, subprocess_env, versions, write_files)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: ``--quick``: a size that runs in seconds on a 2-core CPU (odd vocabulary so tiles do not divide it).
QUICK = dict(n=128, d=64, vocab=3001, repeats=3, warmup=1)
FULL = dict(n=2048, d=512, vocab=151936, repeats=5, warmup=1)
#: Tolerances of the correctness guard (vs a float64 naive reference on the check slice).
TOL = {
    torch.float32: {"logprobs": 2e-3, "entropy": 2e-3, "grad_rel": 1e-3},
    torch.bfloat16: {"logprobs": 5e-2, "entropy": 5e-2, "grad_rel": 5e-2},  # bf16 logits: ~1e-2 observed
}
CHILD_TAG = "BENCH_CHILD_RESULT "


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and runs
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_loss(impl: Impl, hidden, weight, targets, g_lp, g_h):
    """``impl``'s loss to backpropagate: ``sum g_lp logp + g_H H``, or its own ``loss_fn``."""
    if impl.loss_fn is not None:
        return impl.loss_fn(hidden, weight, targets, g_lp, g_h)
    lp, ent = impl.fn(hidden, weight, targets)
    return (g_lp * lp).sum() + (g_h * ent).sum()


def run_fwd(impl: Impl, inputs) -> None:
    """One forward of ``impl`` under ``no_grad``."""
    hidden, weight, targets, _, _ = inputs
    with impl.tuning(), torch.no_grad():
        out = impl.fn(hidden, weight, targets)
    del out


def run_fwdbwd(impl: Impl, inputs) -> None:
    """One forward + backward of ``impl``, grads of hidden and weight cleared first."""
    hidden, weight, targets, g_lp, g_h = inputs
    hidden.grad = None
    weight.grad = None
    with impl.tuning():
        benchmark_loss(impl, hidden, weight, targets, g_lp, g_h).backward()


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` synchronised calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


def time_all(
    runners: dict, warmup: int, repeats: int, device: torch.device, order: str, inputs, progress=None
) -> dict:
    """Times every runner -> ``{spec: (wall times, process CPU times)}``; ``interleaved`` runs repeat r of every
    implementation before repeat r+1 of any, so load that drifts over the run (a shared machine) hits all
    implementations alike. Errors come back as strings."""
    out: dict = {}
    live = dict(runners)
    cpu_times: dict = {}

    def attempt(spec, fn, i):
        try:
            c0 = time.process_time()
            t = time_calls(fn, 0, 1, device)[0]
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
            inputs[0].grad = None
            inputs[1].grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

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


def mm_rate(n, d, vocab, dtype, device, warmup, repeats) -> dict:
    """FLOP/s of ``[n, d] @ [d, min(vocab, 32768)]`` in ``dtype``: the tile GEMM the chunked paths run."""
    v = min(vocab, TRL_CHUNK_SIZE)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    a = torch.randn(n, d, device=gen_device).to(device=device, dtype=dtype)
    b = torch.randn(v, d, device=gen_device).to(device=device, dtype=dtype)
    c = torch.empty(n, v, device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b.t(), out=c), max(warmup, 1), max(repeats, 3), device)
    med = statistics.median(times)
    return {"shape": [n, d, v], "dtype": str(dtype), "median_s": med, "flops_per_s": 2.0 * n * d * v / med}


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------------
def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _grad_bytes(hidden, weight) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None)


def _memory_figures(method: str, extra: int, grad_bytes: int, **more) -> dict:
    return {"status": "ok", "method": method, **more, "peak_extra_bytes": extra, "grad_bytes": grad_bytes,
            "peak_extra_excl_grads_bytes": max(extra - grad_bytes, 0)}


def _max_rss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_memory_child(cfg: dict) -> dict:
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
    run_fwdbwd(impl, tiny)
    run_fwd(impl, tiny)
    del tiny
    inputs = make_inputs(cfg["n"], cfg["d"], cfg["vocab"], dtype, device, cfg["seed"])
    gc.collect()
    _malloc_trim()
    reset = reset_peak_rss()
    before_rss = proc_status_kib("VmRSS")
    if not reset or before_rss is None:  # no clear_refs: ru_maxrss is the best we have (a lower bound of the extra)
        before_rss = _max_rss_kib()
    (run_fwd if cfg["mode"] == "fwd" else run_fwdbwd)(impl, inputs)
    peak = proc_status_kib("VmHWM") if reset else None
    if peak is None:
        peak = _max_rss_kib()
    return _memory_figures("VmHWM after clear_refs" if reset else "ru_maxrss (peak not resettable)",
                           max(peak - before_rss, 0) * 1024, _grad_bytes(inputs[0], inputs[1]),
                           baseline_rss_bytes=before_rss * 1024, peak_rss_bytes=peak * 1024)


def cpu_memory(cfg: dict, timeout: float) -> dict:
    """Runs :func:`cpu_memory_child` in a fresh interpreter (torch has no CPU allocator statistics)."""
    cmd = [sys.executable, "-m", "llm_entreg.bench", "--_child", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"memory subprocess timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "reason": f"memory subprocess rc={proc.returncode}: {' | '.join(tail)}"}


def cuda_memory(impl: Impl, inputs, mode: str, device: torch.device) -> dict:
    """Allocator peak of one call of ``impl`` above the memory held before it."""
    hidden, weight = inputs[0], inputs[1]
    hidden.grad = None
    weight.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    (run_fwd if mode == "fwd" else run_fwdbwd)(impl, inputs)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    grad_bytes = _grad_bytes(hidden, weight)
    hidden.grad = None
    weight.grad = None
    return _memory_figures("torch.cuda.max_memory_allocated - baseline", extra, grad_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# Correctness guard
# ----------------------------------------------------------------------------------------------------------------------
def check_slice(impl: Impl, inputs, k: int, dtype: torch.dtype) -> dict:
    """Forward outputs and grads of hidden/weight on the first ``k`` tokens vs a float64 naive reference."""
    hidden, weight, targets, g_lp, g_h = inputs
    h = hidden.detach()[:k].clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    t, g1, g2 = targets[:k], g_lp[:k], g_h[:k]
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref_lp, ref_h = naive_logprob_entropy(h64, w64, t)
    ((g1.double() * ref_lp).sum() + (g2.double() * ref_h).sum()).backward()
    tol = TOL[dtype]
    out: dict = {"tokens": k, "tolerance": tol}
    with impl.tuning():
        with torch.no_grad():
            lp, ent = impl.fn(h, w, t)
        out["max_abs_diff_logprobs"] = float((lp.double() - ref_lp.detach()).abs().max())
        out["max_abs_diff_entropy"] = None if ent is None else float((ent.double() - ref_h.detach()).abs().max())
        out["grad_rel_err_hidden"] = out["grad_rel_err_weight"] = None
        if impl.loss_fn is None or impl.loss_is_reference:
            benchmark_loss(impl, h, w, t, g1, g2).backward()
            out["grad_rel_err_hidden"] = rel_err(h.grad, h64.grad)
            out["grad_rel_err_weight"] = rel_err(w.grad, w64.grad)
    out["passed"] = passed(out, tol)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` the reference)."""
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def passed(check: dict, tol: dict) -> bool:
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
    """Run ``impl`` forward and forward+backward at full size; compare the sampled rows with
    :func:`sampled_reference`."""
    hidden, weight, targets = inputs[:3]
    with impl.tuning(), torch.no_grad():
        lp, ent = impl.fn(hidden, weight, targets)
    out: dict = {"token_rows": int(rows.numel()), "vocab_rows": int(cols.numel())}
    out["max_abs_diff_logprobs"] = float((lp[rows].double() - ref["logprobs"]).abs().max())
    out["max_abs_diff_entropy"] = None if ent is None else float((ent[rows].double() - ref["entropy"]).abs().max())
    del lp, ent
    out["grad_rel_err_hidden"] = out["grad_rel_err_weight"] = None
    if impl.loss_fn is None or impl.loss_is_reference:
        run_fwdbwd(impl, inputs)
        out["grad_rel_err_hidden"] = rel_err(hidden.grad[rows], ref["grad_hidden"])
        out["grad_rel_err_weight"] = rel_err(weight.grad[cols], ref["grad_weight"])
        hidden.grad = weight.grad = None
    out["passed"] = passed(out, TOL[dtype])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "bench_head.py") -> argparse.ArgumentParser:
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
    p.add_argument("--token-chunk", type=int, default=None,
                   help="token tile of plain ours_chunked (default: chunked.py)")
    p.add_argument("--vocab-chunk", type=int, default=None,
                   help="vocab tile of plain ours_chunked (default: chunked.py)")
    p.add_argument("--out", default="bench_out", help="directory for the .json and .md results (default bench_out)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on the CPU (default: torch's; --quick: 1)")
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


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the size defaults (``--quick`` or full) and checks them."""
    for key, value in (QUICK if args.quick else FULL).items():
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


# ----------------------------------------------------------------------------------------------------------------------
# The run, stage by stage
# ----------------------------------------------------------------------------------------------------------------------
def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _resolve_all(specs: list[str], device: torch.device, args, log) -> tuple[dict, dict]:
    """``(impls, results)``: the implementations that can run here; a result entry for every spec."""
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
    return impls, results


def _memory_plan(args, impls: dict) -> tuple[list[str], tuple[str, ...]]:
    """``(specs, modes)`` whose peak memory is measured."""
    modes = {"both": ("fwd", "fwdbwd"), "fwdbwd": ("fwdbwd",), "off": ()}[args.memory]
    wanted = None if args.mem_impls is None else set(_comma_list(args.mem_impls))
    return [spec for spec in impls if wanted is None or spec in wanted], modes


def _start_cpu_memory(args, mem_specs, mem_modes) -> dict:
    """CPU peak memory: fresh subprocesses, started now so that they overlap the (untimed) correctness checks; they
    are all finished before anything is timed, so they never compete with a timed call."""
    from concurrent.futures import ThreadPoolExecutor

    def child(job):
        spec, mode = job
        cfg = dict(impl=spec, mode=mode, n=args.n, d=args.d, vocab=args.vocab, dtype=args.dtype, seed=args.seed,
                   threads=torch.get_num_threads(), token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk)
        return cpu_memory(cfg, args.mem_timeout)

    pool = ThreadPoolExecutor(max_workers=max(1, args.mem_jobs))
    futures = {(spec, mode): pool.submit(child, (spec, mode)) for spec in mem_specs for mode in mem_modes}
    pool.shutdown(wait=False)
    return futures


def _guard(impls: dict, results: dict, inputs, k: int, dtype, log) -> None:
    """Correctness guard on the first ``k`` tokens: a broken implementation is never timed."""
    for spec, impl in list(impls.items()):
        try:
            chk = check_slice(impl, inputs, k, dtype)
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


def _guard_sampled(impls: dict, results: dict, inputs, args, device, dtype, log) -> None:
    """The full-size check on ``--check-sampled`` sampled token and vocabulary rows."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = torch.randperm(args.n, generator=gen)[: args.check_sampled].to(device)
    cols = torch.randperm(args.vocab, generator=gen)[: args.check_sampled].to(device)
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


def _time_modes(impls: dict, results: dict, inputs, mm: dict, args, device, log) -> None:
    """Forward and forward+backward timings of every implementation, with TFLOP/s and the fraction of ``mm``."""
    nominal = float(args.n) * args.d * args.vocab
    for mode in ("fwd", "fwdbwd"):
        run = run_fwd if mode == "fwd" else run_fwdbwd
        runners = {spec: (lambda impl=impl, run=run: run(impl, inputs)) for spec, impl in impls.items()}
        if args.verbose:
            log(f"  timing {mode} ...")
        timed = time_all(runners, args.warmup, args.repeats, device, args.order, inputs,
                         progress=log if args.verbose else None)
        for spec, value in timed.items():
            res = results[spec]
            if isinstance(value, str):
                res[mode] = {"error": value}
                res["status"] = "error"
                continue
            res[mode] = summary(value[0])
            # Process CPU time (all threads): less sensitive than wall time to other jobs on a shared machine.
            res[mode]["cpu_times_s"] = value[1]
            res[mode]["cpu_median_s"] = statistics.median(value[1]) if value[1] else None
            factor = 2 if mode == "fwd" else impls[spec].fwdbwd_flop_factor
            flops = factor * nominal / res[mode]["median_s"]
            res[mode]["flop_factor"] = factor
            res[mode]["tflops"] = flops / 1e12
            res[mode]["fraction_of_mm"] = flops / mm["flops_per_s"]
    for spec in impls:
        log(f"  {spec:<24} fwd {fmt_time(results[spec].get('fwd'))}  fwd+bwd {fmt_time(results[spec].get('fwdbwd'))}")


def _cuda_memory_all(impls: dict, results: dict, jobs: list, inputs, device) -> None:
    """GPU peak memory: allocator statistics in this process, after the timings."""
    for spec, mode in jobs:
        try:
            mem = cuda_memory(impls[spec], inputs, mode, device)
        except Exception as exc:  # noqa: BLE001
            mem = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
            inputs[0].grad = inputs[1].grad = None
            torch.cuda.empty_cache()
        results[spec]["memory"][mode] = mem


def _log_memory(results: dict, jobs: list, log) -> None:
    for spec, mode in jobs:
        mem = results[spec]["memory"][mode]
        if mem.get("status") == "ok":
            log(f"  {spec:<24} {mode:<6} peak extra {mib(mem['peak_extra_bytes']):,.1f} MiB "
                f"(excl. grads {mib(mem['peak_extra_excl_grads_bytes']):,.1f} MiB)")
        else:
            log(f"  {spec:<24} {mode:<6} memory: {mem.get('reason')}")


def _assemble(args, started, command, info, load_start, specs, k, mm, results) -> dict:
    """The report dict (without ``files``)."""
    return {
        "meta": {
            "date_utc": started.strftime(STAMP),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime(STAMP),
            "command": command,
            "hostname": platform.node(),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            **versions(),
        },
        "device": info,
        "config": {
            "n": args.n, "d": args.d, "vocab": args.vocab, "dtype": args.dtype, "repeats": args.repeats,
            "warmup": args.warmup, "impls": specs, "mem_impls": args.mem_impls, "order": args.order,
            "seed": args.seed, "check_tokens": k, "check_sampled": args.check_sampled, "memory": args.memory,
            "quick": args.quick, "token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk,
            "loss": "(g_lp * logp).sum() + (g_H * H).sum(), g ~ N(0,1) per token; grads to hidden and weight",
            "flops": "fwd 2NdV; fwd+bwd 8NdV with a recomputing backward, 6NdV when the logits are kept",
        },
        "args": {k_: v for k_, v in vars(args).items() if not k_.startswith("_")},
        "matmul_reference": mm,
        "results": results,
        "ratios": head_ratios(results),
    }


def _setup_device(args) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device


def run_bench(args: argparse.Namespace, argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs the benchmark of ``args`` (from :func:`build_parser`), writes ``<out>/<name>.json`` and ``.md``."""
    args = finalize_args(args)
    device = _setup_device(args)
    dtype = DTYPES[args.dtype]
    started = _dt.datetime.now(_dt.timezone.utc)
    command = "python scripts/bench_head.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    info, load_start = device_info(device), loadavg()
    log(f"# bench: N={args.n} d={args.d} V={args.vocab} {args.dtype} on {info['name']}  "
        f"({started:%Y-%m-%d %H:%M UTC})")

    inputs = make_inputs(args.n, args.d, args.vocab, dtype, device, args.seed)
    specs = _comma_list(args.impls)
    impls, results = _resolve_all(specs, device, args, log)
    mem_specs, mem_modes = _memory_plan(args, impls)
    cpu_mem = _start_cpu_memory(args, mem_specs, mem_modes) if device.type != "cuda" and mem_modes else None
    k = min(args.n, args.check_tokens)
    _guard(impls, results, inputs, k, dtype, log)
    if args.check_sampled and impls:
        _guard_sampled(impls, results, inputs, args, device, dtype, log)

    jobs = [(spec, mode) for spec in mem_specs if spec in impls for mode in mem_modes]
    for spec in impls:
        results[spec]["memory"] = {}
    for (spec, mode), fut in (cpu_mem or {}).items():
        mem = fut.result()
        if spec in impls:  # an implementation that failed its check gets no figures
            results[spec]["memory"][mode] = mem

    mm = mm_rate(args.n, args.d, args.vocab, dtype, device, args.warmup, args.repeats)
    log(f"  matmul reference {mm['shape']} {args.dtype}: {mm['flops_per_s'] / 1e12:.3f} TFLOP/s")
    _time_modes(impls, results, inputs, mm, args, device, log)
    if device.type == "cuda":
        _cuda_memory_all(impls, results, jobs, inputs, device)
    _log_memory(results, jobs, log)

    report = _assemble(args, started, command, info, load_start, specs, k, mm, results)
    return _write(report, args, device, log)


def _write(report: dict, args, device, log) -> dict:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_{device.type}_{args.n}x{args.d}x{args.vocab}_{args.dtype}" + (f"_{args.tag}" if args.tag else "")
    md = render_head_markdown(report)
    report["files"] = {"json": str(out_dir / f"{name}.json"), "markdown": str(out_dir / f"{name}.md")}
    write_files(report, md)
    log("")
    log(md)
    log(f"wrote {report['files']['json']} and {report['files']['markdown']}")
    return report


def rerender(path: Path) -> str:
    """Recomputes the ratios of a saved result JSON and rewrites it and its markdown next to it."""
    report = json.loads(path.read_text())
    report["ratios"] = head_ratios(report["results"])
    md = render_head_markdown(report)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._child is not None:
        result = cpu_memory_child(json.loads(args._child))
        print(CHILD_TAG + json.dumps(result), flush=True)
        return 0
    if args.render is not None:
        print(rerender(Path(args.render)))
        return 0
    report = run_bench(args, argv)

    def failed(res):  # running out of memory (naive on a GPU) is a result, not a failure
        errors = [res.get(m, {}).get("error", "") for m in ("fwd", "fwdbwd")]
        return res.get("status") == "check_failed" or any(e and "OutOfMemory" not in e for e in errors)

    return 1 if any(failed(r) for r in report["results"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
