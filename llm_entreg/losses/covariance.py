"""Per-token pieces of the covariance-based policy losses (Clip-Cov, KL-Cov) and entropy-shaped advantages.

Pure tensor functions; the global means, the top fraction and the random subset over every rank's tokens are the
trainer's (``trainers/policy_loss.py``). The math: docs/formulations.md ("More entropy methods").
"""

from __future__ import annotations

import torch

#: A Mersenne prime: products of two residues stay below 2**62, so the hashing below never overflows int64.
_P = 2**31 - 1


def shaped_advantages(advantages: torch.Tensor, entropy: torch.Tensor, coef: float, clip: float) -> torch.Tensor:
    """``A + min(coef · sg(H), |A| / clip)`` per token (Cheng et al., arXiv 2506.14758); no gradient through ``H``.

    With ``clip > 1`` the added term never flips the sign of ``A`` and vanishes where ``A = 0``.
    """
    bonus = torch.minimum(coef * entropy.detach(), advantages.abs() / clip)
    return advantages + bonus


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, mean_logp, mean_adv) -> torch.Tensor:
    """``(sg(log π) - mean) · (A - mean)`` per token, the means taken over every valid token of the batch."""
    return (logp.detach() - mean_logp) * (advantages - mean_adv)


def clip_cov_token_loss(logp, old_logp, advantages, selected, clip_low: float, clip_high: float,
                        delta: float | None = None) -> torch.Tensor:
    """GRPO's clipped surrogate per token, zero (no gradient) on the ``selected`` tokens (Clip-Cov)."""
    ratio = torch.exp(logp - old_logp)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(capped * advantages, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages)
    return torch.where(selected, torch.zeros_like(loss), loss)


def clipped_by_ppo(logp, old_logp, advantages, clip_low: float, clip_high: float) -> torch.Tensor:
    """Tokens whose clipped term is the active one (their gradient is already cut by the PPO clip)."""
    ratio = torch.exp(logp.detach() - old_logp)
    return -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) > -advantages * ratio


def kl_cov_token_loss(logp, old_logp, advantages, selected, kl_coef: float) -> torch.Tensor:
    """The unclipped surrogate ``-A · ρ`` per token, plus ``kl_coef · |log π - log π_old|`` on the ``selected``
    tokens (KL-Cov; no ratio clipping)."""
    log_ratio = logp - old_logp
    loss = -advantages * torch.exp(log_ratio)
    return loss + torch.where(selected, kl_coef * log_ratio.abs(), torch.zeros_like(loss))


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
               step: int) -> torch.Tensor:
    """A pseudo-random key in [0, 1) per completion token ``[B, completion_length]`` that depends only on the step,
    the sequence's attended token ids and the token's position in its completion: the same token gets the same
    key on whichever rank, in whichever batch order and with whichever padding it is held."""
    ids = input_ids.long() % _P
    attended = attention_mask.bool()
    h = torch.full((ids.shape[0],), (int(step) * 1_000_003 + 12345) % _P, dtype=torch.long, device=ids.device)
    for t in range(ids.shape[1]):  # a polynomial hash over the attended tokens only (padding is skipped)
        h = torch.where(attended[:, t], (h * 48271 + ids[:, t] + 1) % _P, h)
    pos = torch.arange(completion_length, device=ids.device, dtype=torch.long)
    key = (h.unsqueeze(1) * 16807 + (pos.unsqueeze(0) + 1) * 69621) % _P
    for _ in range(3):  # a few rounds of multiplicative mixing
        key = (key * 48271 + 11) % _P
    return key.double() / _P
