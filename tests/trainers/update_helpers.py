"""Shared check of the trainer tests that compare two training runs of one model."""

from __future__ import annotations

import torch


def assert_same_update_that_moved(one, two, model) -> None:
    """The two trainers' weights agree after training, and training really moved them away from ``model``'s."""
    start = dict(model.named_parameters())
    moved = 0.0
    for (name, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters(), strict=True):
        torch.testing.assert_close(p1, p2, atol=2e-6, rtol=1e-5, msg=name)
        moved = max(moved, (p1.detach() - start[name].detach()).abs().max().item())
    assert moved > 1e-4
