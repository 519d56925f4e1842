"""Small shared helpers (``utils.py``)."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.utils import package_version, torch_threads


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    target = 2 if before != 2 else 1
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(target):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        with torch_threads(0):
            pass


def test_package_version():
    assert package_version("torch").split("+")[0] == torch.__version__.split("+")[0]
    assert package_version("no-such-distribution-xyz") == "unknown"
