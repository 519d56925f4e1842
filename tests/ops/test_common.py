"""Shared types, input checks and backend resolution of the ops (``ops/_common.py``)."""

from __future__ import annotations

import pytest
import torch

from llm_entreg.ops._common import (BACKENDS, check_extras, check_linear, check_logits, gathered_params,
                                    resolve_backend)


def test_resolve_backend_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "chunked"
    for name in ("torch", "chunked"):
        assert resolve_backend(name, cpu) == name
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        resolve_backend("cuda", cpu)
    assert set(BACKENDS) == {"auto", "torch", "chunked", "triton"}


def test_check_extras_names_the_unknown_one():
    assert check_extras(["is_top1"]) == ("is_top1",)
    with pytest.raises(ValueError, match=r"^extras: unknown output\(s\) \['nope'\]"):
        check_extras(("mean_logits", "nope"))


def test_check_linear_returns_the_compute_dtype():
    h, w, t = torch.randn(4, 3), torch.randn(10, 3), torch.tensor([0, 1, -100, 9])
    assert check_linear(h, w, None, t, 1.0, -100) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert check_linear(h, w, None, t, 1.0, -100) == torch.bfloat16
    with pytest.raises(ValueError, match=r"^weight: dtype"):
        check_linear(h, w.double(), None, t, 1.0, -100)


def test_check_logits_refuses_out_of_range_targets():
    check_logits(torch.randn(2, 7), torch.tensor([0, -100]), 1.0, -100)
    with pytest.raises(ValueError, match=r"^targets: value 7 is outside \[0, 7\)"):
        check_logits(torch.randn(2, 7), torch.tensor([0, 7]), 1.0, -100)


def test_gathered_params_is_a_no_op_without_zero3():
    w = torch.randn(3, 2)
    with gathered_params(w, None):
        assert w.shape == (3, 2)
