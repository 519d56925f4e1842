#!/usr/bin/env python
"""Benchmark of fused log-prob + entropy LM heads: ours (chunked / Triton) vs TRL's chunked path vs naive.

All implementations run in one process on the same inputs; results go to ``<--out>/bench_*.json`` and ``.md``.
The logic lives in :mod:`llm_entreg.bench` (also behind ``llm-entreg bench``); see docs/benchmarks.md.

    python scripts/bench_entropy.py --quick                      # seconds on a CPU
    python scripts/bench_entropy.py --n 2048 --d 512 --vocab 151936 --dtype fp32 --device cpu
    python scripts/bench_entropy.py --n 16384 --d 4096 --vocab 151936 --dtype bf16 --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from llm_entreg.bench import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llm_entreg.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
