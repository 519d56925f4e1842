"""tests/ops: the Triton kernels run on a CPU-only machine under the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` each time a function is decorated with ``@triton.jit`` — and its own ``tl.sum``,
``tl.max``, ... are decorated when ``triton`` is first imported. So the variable must be set before the first
``import triton`` of the process *and* while ``llm_entreg.ops.triton_*`` are imported. That switch lives in
``tests/conftest.py``, the first conftest pytest loads (test modules elsewhere, e.g. tests/distributed, import TRL's
trainers, which import triton). It restores the environment afterwards, so subprocesses do not see the variable;
with CUDA nothing is changed and the kernels are compiled. The Triton test modules check which case they got, and
rerun themselves in a fresh process if triton was imported too early anyway.
"""

import pytest


@pytest.fixture
def triton_small_blocks(monkeypatch):
    """Triton blocks much smaller than the test sizes (see ``triton_helpers.use_small_blocks``)."""
    from .triton_helpers import use_small_blocks

    use_small_blocks(monkeypatch)
