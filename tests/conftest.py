"""Session-wide test settings: one warm-start cache for the whole suite (and the README main job)."""

from __future__ import annotations

import os
from pathlib import Path

# The embedded default's SFT warm start is trained once and cached; every test that needs it shares this copy.
os.environ.setdefault("LLM_ENTREG_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "llm_entreg"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's models are tiny: one thread is faster than two on a 2-core CI machine (no contention with itself)
torch.set_num_threads(1)


# Triton kernels on a CPU-only machine run under the interpreter, which must be switched on before the first
# `import triton` of the process (TRL's trainers import triton, and tests/distributed is collected before
# tests/ops). Done here, in the first conftest pytest loads; see tests/ops/test_triton_backend.py.
import importlib.util  # noqa: E402
import sys  # noqa: E402


def _import_kernels_interpreted() -> None:
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return  # too late for this process: the triton tests rerun themselves in a fresh one
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        try:  # imported lazily by the interpreter's first launch, and it asserts the variable at import time
            import triton.experimental.gluon  # noqa: F401
        except ImportError:  # older triton without gluon
            pass
        import llm_entreg.ops.triton_linear  # noqa: F401
        import llm_entreg.ops.triton_logits  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_kernels_interpreted()


@pytest.fixture
def run_ranks():
    """``run_ranks(target, world, tmp_path)``: ``target(rank, str(tmp_path))`` in ``world`` processes, each joined
    (60 s) and required to exit 0; stragglers are killed. Fork where available: the children inherit the imported
    torch (spawn would re-import it: seconds instead of ~0.1 s), and touch only tiny tensors and gloo's own threads."""
    import torch.multiprocessing as mp

    def run(target, world: int, tmp_path) -> None:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        procs = [ctx.Process(target=target, args=(r, str(tmp_path))) for r in range(world)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout=60)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()

    return run


@pytest.fixture
def launched_commands(monkeypatch):
    """The commands ``llm_entreg.launch`` starts, recorded instead of run (each "exits" 0 at once)."""
    from llm_entreg import launch

    calls: list[list[str]] = []

    class Launched:
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            self.pid = -1

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Launched)
    return calls
