#!/usr/bin/env python
"""Time vs N per implementation for several vocabularies: table + log-log plot (see llm_entreg/bench/sizes.py).

    python scripts/bench_sizes.py --ns 2048,16384,65536 --vocabs 128256,151936,262144 --d 4096 --dtype bf16
"""

from llm_entreg.bench.sizes import main

if __name__ == "__main__":
    raise SystemExit(main())
