#!/usr/bin/env python
"""The Triton head's two modes timed alone (not interleaved with other implementations), CUDA events.

    python scripts/gpu/time_head_modes.py          # N=16384, d=4096, V=151936, bf16; modes gemm, tiles, gemm

Per mode: 2 warm-up steps, then 8 timed forward+backward steps (loss = sum g1 logp + g2 H, grads to hidden and
weight), median and min; and the host time to issue one step (the GPU runs asynchronously, so a host time well
below the step time means the step is not bound by Python or launch overhead). CUDA only.
"""

import time

import torch

from llm_entreg.ops import linear_logprob_and_entropy, triton_linear


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA only")
        return 0
    n, d, v = 16384, 4096, 151936
    h = torch.randn(n, d, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda") / 64).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    g1, g2 = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")

    def step():
        lp, e = linear_logprob_and_entropy(h, w, t, backend="triton")
        ((g1 * lp).sum() + (g2 * e).sum()).backward()
        h.grad = w.grad = None

    for mode in ("gemm", "tiles", "gemm"):
        with triton_linear.tuning(head_mode=mode):
            times, host = _time_steps(step)
        print(f"{mode} median {times[4]:.1f} min {times[0]:.1f} ms; host time to issue one step {host * 1e3:.1f} ms")
    return 0


def _time_steps(step):
    """2 warm-up steps, then 8 timed with CUDA events (ms, sorted); and the host seconds to issue one more."""
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(8):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    t0 = time.perf_counter()
    step()
    return times, time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
