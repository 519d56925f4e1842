"""``python -m llm_entreg.bench``: the kernel benchmark (``llm-entreg bench``, scripts/bench_head.py)."""

from llm_entreg.bench.head import main

raise SystemExit(main())
