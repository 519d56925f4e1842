#!/usr/bin/env python
"""Where the fused head's time goes: one forward+backward per mode under torch.profiler, kernels by GPU time.

    python scripts/profile_head.py --n 16384 --d 4096 --vocab 151936 --modes gemm,tiles

Prints, per mode, the kernels sorted by total GPU time (cuBLAS GEMMs, the Triton row kernels, the tile kernels,
elementwise torch ops), so the gap to the 8NdV floor can be put on its pieces. CUDA only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_entreg.ops import linear_logprob_and_entropy, triton_linear  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--modes", default="gemm,tiles")
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA only")
        return 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(args.n, args.d, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    w = (torch.randn(args.vocab, args.d, device="cuda", generator=gen) / args.d**0.5).bfloat16().requires_grad_(True)
    t = torch.randint(0, args.vocab, (args.n,), device="cuda", generator=gen)
    g1, g2 = torch.randn(args.n, device="cuda"), torch.randn(args.n, device="cuda")

    def step():
        lp, ent = linear_logprob_and_entropy(h, w, t, backend="triton")
        ((g1 * lp).sum() + (g2 * ent).sum()).backward()
        h.grad = w.grad = None

    for mode in args.modes.split(","):
        triton_linear.set_head_mode(mode)
        step()
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        total = sum(e.device_time_total for e in ev) / 1e3
        print(f"### mode {mode}: {total:.1f} ms of GPU kernels in one fwd+bwd "
              f"(N={args.n}, d={args.d}, V={args.vocab}, bf16)")
        print(ev.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=60))
    triton_linear.set_head_mode(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
