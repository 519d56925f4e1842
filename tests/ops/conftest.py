"""tests/ops: make the Triton kernels runnable on a CPU-only machine, under the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` each time a function is decorated with ``@triton.jit`` — and its own ``tl.sum``,
``tl.max``, ... are decorated when ``triton`` is first imported. So the variable must be set before the first
``import triton`` of the process *and* while ``llm_entreg.ops.triton_*`` are imported; setting it at the top of a
test module is too late whenever an earlier module of the session imported TRL's trainers (which import triton).

This conftest is loaded before any module of tests/ops. On a machine without CUDA it sets the variable, imports
triton and our two kernel modules (their kernels become interpreted functions that run on CPU tensors), then
restores the environment, so that nothing else in the session (subprocesses included) sees the variable. With CUDA,
nothing is changed and the kernels are compiled. ``tests/ops/test_triton_backend.py`` checks which case it got.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


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
