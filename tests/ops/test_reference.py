"""The float64 reference (``ops/reference.py``) against hand-computed entropies, including a ``-inf`` column."""

from __future__ import annotations

import math

import pytest
import torch

from llm_entreg.ops import logprob_and_entropy


def test_reference_entropy_hand_computed():
    # logits [0, ln 2, ln 3] (T=1): p = [1/6, 2/6, 3/6]; H = -sum p ln p = 1.0114042647...
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    targets = torch.tensor([2])
    lp, ent = logprob_and_entropy(logits, targets, backend="torch")
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    expected_h = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))
    assert ent.item() == pytest.approx(expected_h, abs=1e-6)
    # A -inf column adds nothing: p = [1/3, 2/3, 0]
    logits = torch.tensor([[0.0, math.log(2.0), float("-inf")]])
    for backend in ("torch", "chunked"):
        _, ent = logprob_and_entropy(logits, torch.tensor([0]), backend=backend)
        expected = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
        assert ent.item() == pytest.approx(expected, abs=1e-6)
