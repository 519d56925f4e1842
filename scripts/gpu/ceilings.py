#!/usr/bin/env python
"""The GPU's two ceilings, measured in the same call as the benchmarks (measured, not quoted from a data sheet).

- copy bandwidth: a 2 GiB device-to-device copy, bytes read + written over the median time of 20 copies;
- bf16 matmul rate: 8192^3 on random data, and the LM-head-shaped [16384, 4096] @ [4096, 32768], median of 20;
- the fused head's time floors at the measured rate: forward 2NdV, recomputing fwd+bwd 8NdV, loss-fused 6NdV,
  at the H200 benchmark case (N = 16384, d = 4096, V = 151936).

Writes ``--out`` (JSON) and prints a short table. On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess

import torch


def _events_median(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _copy_rate(dev) -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    n_bytes = 2 * 2**30
    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _events_median(lambda: dst.copy_(src))


def _mm_rate(dev, m: int, k: int, n: int) -> float:
    """FLOP/s of a bf16 ``[m, k] @ [k, n]`` on random data (the weight stored ``[n, k]``, as an LM head's)."""
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    c = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    return 2 * m * k * n / _events_median(lambda: torch.mm(a, b.t(), out=c))


def measure() -> dict:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    out = {
        "name": torch.cuda.get_device_name(dev),
        "sm_count": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "memory_bytes": props.total_memory,
        "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        out["triton"] = f"not importable: {exc}"
    try:
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        out["nvidia_smi"] = f"unavailable: {exc}"
    out["copy_bytes_per_s"] = _copy_rate(dev)
    out["bf16_mm_8192_flops_per_s"] = _mm_rate(dev, 8192, 8192, 8192)
    out["bf16_mm_head_flops_per_s"] = _mm_rate(dev, 16384, 4096, 32768)
    torch.cuda.empty_cache()
    rate = out["bf16_mm_8192_flops_per_s"]
    ndv = 16384 * 4096 * 151936
    out["floors_ms"] = {f"{k}NdV": 1e3 * k * ndv / rate for k in (2, 6, 8)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ceilings.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    res = measure()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"{res['name']}: {res['sm_count']} SMs, L2 {res['l2_bytes']}, torch {res['torch']}, triton {res['triton']}")
    print(f"nvidia-smi: {res['nvidia_smi']}")
    print(f"copy {res['copy_bytes_per_s'] / 1e12:.2f} TB/s; "
          f"bf16 mm 8192^3 {res['bf16_mm_8192_flops_per_s'] / 1e12:.0f} "
          f"TFLOP/s; head-shaped {res['bf16_mm_head_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print("floors at the 8192^3 rate: " + ", ".join(f"{k} {v:.1f} ms" for k, v in res["floors_ms"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
