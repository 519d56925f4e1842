#!/usr/bin/env python
"""End-to-end step benchmark: one DPO and one GRPO optimizer step, our trainers + fused head vs TRL's own.

Step time (median of --steps after --warmup), GRPO generation+scoring apart from the loss step, peak memory and the
first-step loss of every configuration; results go to ``<--out>/bench_step_*.json`` and ``.md``. The logic (and the
argparse options) live in :mod:`llm_entreg.bench.step`.

    python scripts/bench_step.py --tiny --device cpu                        # seconds on a CPU
    python scripts/bench_step.py --device cuda                              # Qwen2.5-0.5B shape, V=151936, bf16
    python scripts/bench_step.py --device cuda --configs dpo_ours,dpo_trl --steps 5 --batch 4
"""

from llm_entreg.bench.step import main

if __name__ == "__main__":
    raise SystemExit(main())
