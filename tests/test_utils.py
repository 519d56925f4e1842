"""Small shared helpers (``utils.py``)."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.utils import package_version, pass_at_k, torch_threads


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


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0  # everything correct
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(16, 1, 16) == 1.0  # n = k: any correct sample is in the draw
    assert pass_at_k(16, 15, 2) == 1.0  # n - c < k
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)
