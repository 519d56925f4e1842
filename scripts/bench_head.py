#!/usr/bin/env python
"""Benchmark of fused log-prob + entropy LM heads: ours (chunked / Triton / loss-fused) vs TRL's chunked path vs naive.

All implementations run in one process on the same inputs; results go to ``<--out>/bench_*.json`` and ``.md``.
The logic lives in :mod:`llm_entreg.bench.head` (also behind ``llm-entreg bench``); see docs/benchmarks.md.

    python scripts/bench_head.py --quick                      # seconds on a CPU
    python scripts/bench_head.py --n 2048 --d 512 --vocab 151936 --dtype fp32 --device cpu
    python scripts/bench_head.py --n 16384 --d 4096 --vocab 151936 --dtype bf16 --device cuda
"""

from llm_entreg.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
