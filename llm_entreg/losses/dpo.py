"""DPO's per-pair losses (TRL's ``sigmoid``, ``hinge`` and ``ipo`` with the reverse KL, and H-DPO's α) and their
loss-fused form: a per-token loss whose sum over a chunk of whole pairs is the chunk's share of the batch loss.

The fused form needs every token of both completions of a pair in one chunk (the pair loss depends on their sums):
``fused_linear_loss(groups=pair id per position)`` provides that. Derivation: docs/kernels.md ("Loss-fused DPO").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The DPO loss types the loss-fused path forms in the head's forward (each a closed form of the sequence sums).
DPO_FUSED_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_pair_losses(chosen, rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str, alpha: float = 1.0,
                    chosen_len=None, rejected_len=None) -> torch.Tensor:
    """Per-pair loss from the sequence log-prob sums (TRL's formulas, reverse KL; ``alpha``: H-DPO's α on the
    policy log-probs). ``ipo`` needs the completion lengths (TRL normalizes its scores by them)."""
    chosen_scores = alpha * chosen - ref_chosen
    rejected_scores = alpha * rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_scores - rejected_scores))
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_scores - rejected_scores))
    if loss_type == "ipo":
        delta = chosen_scores / chosen_len.clamp(min=1.0) - rejected_scores / rejected_len.clamp(min=1.0)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type: the loss-fused DPO supports {DPO_FUSED_LOSS_TYPES}, got {loss_type!r}")


def dpo_fused_token_loss(pair_of: torch.Tensor, is_chosen: torch.Tensor, ref_chosen: torch.Tensor,
                         ref_rejected: torch.Tensor, lengths: torch.Tensor, entropy_weights: torch.Tensor, *,
                         beta: float, loss_types, loss_weights, alpha: float = 1.0):
    """The ``loss_fn`` of :func:`llm_entreg.ops.fused_linear_loss` for a DPO micro-batch of ``P`` pairs.

    Per position of the flattened ``[2P, T]`` label grid: ``pair_of`` (the pair), ``is_chosen``, ``entropy_weights``
    (the entropy term's weight, 0 where it does not apply); per pair: the reference sums ``ref_chosen``,
    ``ref_rejected`` and ``lengths [P, 2]`` (chosen, rejected completion tokens). The chunk's per-token values sum to
    ``Σ_pairs in chunk Σ_types w · loss / P`` plus ``Σ_tokens w_H · H``: TRL's batch mean, split by pairs.
    """
    n_pairs = ref_chosen.shape[0]

    def loss_fn(lp, ent, rows):
        pair = pair_of[rows]
        chosen = is_chosen[rows]
        present, slot = torch.unique(pair, return_inverse=True)
        zeros = torch.zeros(present.numel(), dtype=lp.dtype, device=lp.device)
        s_chosen = zeros.index_add(0, slot, torch.where(chosen, lp, torch.zeros_like(lp)))
        s_rejected = zeros.index_add(0, slot, torch.where(chosen, torch.zeros_like(lp), lp))
        lens = lengths[present].to(lp.dtype)
        total = zeros
        for loss_type, weight in zip(loss_types, loss_weights):
            pair_loss = dpo_pair_losses(s_chosen, s_rejected, ref_chosen[present].to(lp.dtype),
                                        ref_rejected[present].to(lp.dtype), beta=beta, loss_type=loss_type,
                                        alpha=alpha, chosen_len=lens[:, 0], rejected_len=lens[:, 1])
            total = total + weight * pair_loss / n_pairs
        tokens = zeros.index_add(0, slot, torch.ones_like(lp))
        return total[slot] / tokens[slot] + entropy_weights[rows].to(lp.dtype) * ent

    return loss_fn
