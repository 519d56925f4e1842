#!/usr/bin/env python
"""Where a fused head's wall time goes, in one process: timed steps with GPU clock samples, host issue time, and one
profiled step's GPU busy time and idle gaps (``llm_entreg.bench.profile``). CUDA only.

    python scripts/gpu/profile_head.py --n 16384 --d 4096 --vocab 151936 \
        --impls ours_triton,trl_chunked,ours_triton@+tiles --rounds 2 --out /tmp/profile

Implementations are the bench's specs (``scripts/bench_head.py --impls``), run in turn ``--rounds`` times on the
same inputs. Per run it prints the wall median, the host issue time, GPU busy time + idle gaps of one profiled step,
the SM clock, power and clock-event reasons during the timed steps, and the kernels by GPU time; with ``--out``,
``profile.json`` (rewritten after every run) and one gzipped Chrome trace per profiled step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llm_entreg.bench import profile as bench_profile
from llm_entreg.bench.head import DTYPES


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--impls", default="ours_triton,trl_chunked")
    ap.add_argument("--steps", type=int, default=16, help="timed steps per run (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="times every implementation runs, in turn")
    ap.add_argument("--out", type=Path, default=None, help="folder for profile.json")
    args = ap.parse_args()
    impls = [s for s in args.impls.split(",") if s]
    bench_profile.check_specs(impls)  # a typo fails here, on a CPU too, not after the GPU machine has started
    if not torch.cuda.is_available():
        print("profile_head.py: CUDA only (kernel times and GPU clocks); nothing to do here")
        return 0
    bench_profile.run(impls, args.n, args.d, args.vocab, DTYPES[args.dtype],
                      args.steps, args.warmup, args.rounds, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
