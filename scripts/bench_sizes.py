"""Time vs N per implementation for several vocabularies: table + log-log plot (see llm_entreg/bench_sizes.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_entreg.bench_sizes import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
