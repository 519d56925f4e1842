"""How to accumulate the LM head's weight gradient over token chunks when the weight is bf16: the error of each
accumulator against float64, for the chunk counts of a real step (docs/benchmarks.md, "grad_W accumulators").

    python scripts/bench_grad_accumulator.py            # V 8192, d 256, 1024-token chunks, 8..128 chunks, 3 seeds

Accumulators: ``fp32`` (one fp32 [V, d] buffer, cast once: today's), ``bf16`` (add each chunk's fp32 product into a
bf16 buffer: Liger's choice), ``bf16_kahan`` (a bf16 hi/lo pair, compensated: the memory of one fp32 buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def contributions(seed: int, chunks: int, vocab: int, dim: int, tokens: int):
    """Per-chunk ``dz.T @ h`` products as the op forms them: bf16 operands, fp32 result; and their float64 sum."""
    g = torch.Generator().manual_seed(seed)
    exact = torch.zeros(vocab, dim, dtype=torch.float64)
    parts = []
    for _ in range(chunks):
        h = torch.randn(tokens, dim, generator=g).bfloat16()
        probs = torch.softmax(torch.randn(tokens, vocab, generator=g) * 3, -1)  # dz = p - onehot: mostly tiny
        dz = probs.clone()
        dz[torch.arange(tokens), torch.randint(0, vocab, (tokens,), generator=g)] -= 1
        dz = (dz / tokens).bfloat16()
        part = dz.float().t() @ h.float()
        parts.append(part)
        exact += dz.double().t() @ h.double()
    return parts, exact


def accumulate(parts, kind: str) -> torch.Tensor:
    if kind == "fp32":
        acc = torch.zeros_like(parts[0])
        for p in parts:
            acc += p
        return acc.bfloat16().double()
    if kind == "bf16":
        acc = torch.zeros(parts[0].shape, dtype=torch.bfloat16)
        for p in parts:
            acc = (acc.float() + p).bfloat16()
        return acc.double()
    hi = torch.zeros(parts[0].shape, dtype=torch.bfloat16)
    lo = torch.zeros_like(hi)
    for p in parts:  # Kahan in a bf16 pair: hi + lo carries what one bf16 rounds away
        y = p - lo.float()
        t = (hi.float() + y).bfloat16()
        lo = ((t.float() - hi.float()) - y).bfloat16()
        hi = t
    return (hi.float() - lo.float()).bfloat16().double()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunks", default="8,32,128")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for chunks in map(int, args.chunks.split(",")):
        errors = {k: [] for k in ("fp32", "bf16", "bf16_kahan")}
        for seed in range(args.seeds):
            parts, exact = contributions(seed, chunks, args.vocab, args.dim, args.tokens)
            for kind in errors:
                errors[kind].append(((accumulate(parts, kind) - exact).norm() / exact.norm()).item())
        row = {"chunks": chunks, **{k: statistics.median(v) for k, v in errors.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
