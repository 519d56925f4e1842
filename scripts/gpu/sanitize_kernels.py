#!/usr/bin/env python
"""Every Triton kernel of llm_entreg.ops once, at small odd sizes, forward and backward, against float64.

Meant to run under ``compute-sanitizer --tool memcheck`` (and ``racecheck``) on the GPU machine: small sizes keep the
sanitizer's slowdown affordable, odd sizes put every ragged edge in play (d = 200 is not a multiple of BLOCK_D,
V = 5003 is not a multiple of any block), and each case is checked against a float64 reference so a wrong result
is caught as well as a bad access. Exit code 1 on any mismatch. Without CUDA it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llm_entreg.ops import fused_linear_loss, linear_token_stats, token_stats, triton_linear  # noqa: E402
from llm_entreg.ops.reference import reference_linear_token_stats, reference_token_stats  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXTRAS = ("mean_logits", "is_top1", "log_sum_sq_probs")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def linear_case(n, d, v, dtype, seed, mode="tiles"):
    """The fused head in one mode; "gemm" with a buffer of 64 fp32 rows, so both passes run several chunks."""
    with triton_linear.tuning(head_mode=mode, gemm_buffer_bytes=64 * v * 4):
        return _linear_case(n, d, v, dtype, seed)


def _linear_case(n, d, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.25).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.2] = -100
    g1, g2 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    params = [t.to(DEV).requires_grad_(True) for t in (hidden, weight, bias)]
    st = linear_token_stats(params[0], params[1], targets.to(DEV), bias=params[2], temperature=0.9,
                            backend="triton", extras=EXTRAS)
    got = torch.autograd.grad((g1.to(DEV) * st.logprobs).sum() + (g2.to(DEV) * st.entropy).sum(), params)
    ref_p = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_linear_token_stats(ref_p[0], ref_p[1], targets, bias=ref_p[2], temperature=0.9,
                                       dtype=torch.float64, extras=EXTRAS)
    exp = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), ref_p)
    errs = {
        "logprobs": float((st.logprobs.detach().cpu().double() - ref.logprobs.detach()).abs().max()),
        "entropy": float((st.entropy.detach().cpu().double() - ref.entropy.detach()).abs().max()),
        "top1_mismatch": int((st.is_top1.cpu() != ref.is_top1).sum()),
        **{f"grad_{k}": _rel(g.cpu(), e) for k, g, e in zip(("hidden", "weight", "bias"), got, exp)},
    }
    lim = 1e-4 if dtype == torch.float32 else 2e-3
    ok = errs["logprobs"] < lim and errs["entropy"] < lim and errs["top1_mismatch"] <= 1
    grad_lim = 1e-4 if dtype == torch.float32 else 1e-2
    ok = ok and all(errs[f"grad_{k}"] < grad_lim for k in ("hidden", "weight", "bias"))
    return ok, errs


def logits_case(n, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100
    g1, g2 = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    x = logits.to(DEV).requires_grad_(True)
    st = token_stats(x, targets.to(DEV), temperature=1.3, backend="triton", extras=EXTRAS)
    (got,) = torch.autograd.grad((g1.to(DEV) * st.logprobs).sum() + (g2.to(DEV) * st.entropy).sum(), [x])
    x64 = logits.double().requires_grad_(True)
    ref = reference_token_stats(x64, targets, temperature=1.3, dtype=torch.float64, extras=EXTRAS)
    (exp,) = torch.autograd.grad((g1.double() * ref.logprobs).sum() + (g2.double() * ref.entropy).sum(), [x64])
    errs = {"logprobs": float((st.logprobs.detach().cpu().double() - ref.logprobs.detach()).abs().max()),
            "entropy": float((st.entropy.detach().cpu().double() - ref.entropy.detach()).abs().max()),
            "grad_logits": _rel(got.cpu(), exp)}
    lim = 1e-4 if dtype == torch.float32 else 2e-3
    return errs["logprobs"] < lim and errs["entropy"] < lim and errs["grad_logits"] < 1e-2, errs


def fused_loss_case(n, d, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.25).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = -100
    c = torch.randn(n, generator=gen)

    def loss_fn(lp, h, rows):
        return c.to(lp.device)[rows] * lp - 0.01 * h

    params = [t.to(DEV).requires_grad_(True) for t in (hidden, weight)]
    loss, _ = fused_linear_loss(params[0], params[1], targets.to(DEV), loss_fn, token_chunk=64, backend="triton")
    got = torch.autograd.grad(loss, params)
    ref_p = [t.double().requires_grad_(True) for t in (hidden, weight)]
    ref = reference_linear_token_stats(ref_p[0], ref_p[1], targets, dtype=torch.float64)
    rows = (targets != -100).nonzero().squeeze(1)
    ref_loss = loss_fn(ref.logprobs[rows], ref.entropy[rows], rows).sum()
    exp = torch.autograd.grad(ref_loss, ref_p)
    errs = {"loss": abs(float(loss) - float(ref_loss)) / max(1.0, abs(float(ref_loss))),
            **{f"grad_{k}": _rel(g.cpu(), e) for k, g, e in zip(("hidden", "weight"), got, exp)}}
    return errs["loss"] < 1e-3 and all(errs[k] < 1e-2 for k in ("grad_hidden", "grad_weight")), errs


def main() -> int:
    cases = [
        ("linear fp32 d=200", lambda: linear_case(333, 200, 5003, torch.float32, 1)),
        ("linear bf16 d=256", lambda: linear_case(333, 256, 5003, torch.bfloat16, 2)),
        ("linear fp32 d=200 gemm mode", lambda: linear_case(333, 200, 5003, torch.float32, 6, "gemm")),
        ("linear bf16 d=256 gemm mode", lambda: linear_case(333, 256, 5003, torch.bfloat16, 7, "gemm")),
        ("logits fp32", lambda: logits_case(77, 5003, torch.float32, 3)),
        ("logits bf16", lambda: logits_case(77, 5003, torch.bfloat16, 4)),
        ("fused loss bf16", lambda: fused_loss_case(200, 256, 5003, torch.bfloat16, 5)),
    ]
    bad = 0
    for name, fn in cases:
        ok, errs = fn()
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in errs.items()), flush=True)
    print("all kernels match float64" if not bad else f"{bad} case(s) FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
