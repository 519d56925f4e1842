"""Session-wide test settings: one warm-start cache for the whole suite (and the README main job)."""

from __future__ import annotations

import os
from pathlib import Path

# The embedded default's SFT warm start is trained once and cached; every test that needs it shares this copy.
os.environ.setdefault("LLM_ENTREG_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llm_entreg"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

# The suite's models are tiny: one thread is faster than two on a 2-core CI machine (no contention with itself)
torch.set_num_threads(1)
