"""Plain-torch log-prob and entropy: the ground truth the kernels are tested against.

Materializes the full ``[..., V]`` logits; computes in ``dtype`` (float64 for tests). Positions whose target
equals ``ignore_index`` give 0 and receive zero gradient; ``-inf`` logits contribute exactly 0 to the entropy.
"""

from __future__ import annotations

import torch

from ._common import TokenStats


def _masked_logits(logits: torch.Tensor, valid: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    z = logits.to(dtype) / temperature
    # Ignored rows are replaced by zeros so that a degenerate row there cannot create a NaN in the gradient.
    return torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))


def reference_token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
    extras: tuple[str, ...] = (),
) -> TokenStats:
    """Log-prob of ``targets`` and entropy of ``softmax(logits / temperature)``, plus optional extras."""
    valid = targets != ignore_index
    z = _masked_logits(logits, valid, temperature, dtype)
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))
    # H = lse - sum_i p_i z_i ; -inf columns have p_i = 0 and are replaced by 0 so that 0 * -inf never appears.
    entropy = lse - (p * finite_z).sum(-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprobs = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logprobs = torch.where(valid, logprobs, zero)
    entropy = torch.where(valid, entropy, zero)
    out = {"logprobs": logprobs, "entropy": entropy}
    with torch.no_grad():
        if "mean_logits" in extras:
            out["mean_logits"] = torch.where(valid, z.mean(-1), zero)
        if "is_top1" in extras:
            out["is_top1"] = (z.argmax(-1) == safe_targets) & valid
        if "log_sum_sq_probs" in extras:
            out["log_sum_sq_probs"] = torch.where(valid, torch.logsumexp(2 * (z - lse.unsqueeze(-1)), dim=-1), zero)
    return TokenStats(**out)


def reference_logprob_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    stats = reference_token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index, dtype=dtype)
    return stats.logprobs, stats.entropy


def reference_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
    extras: tuple[str, ...] = (),
) -> TokenStats:
    """The LM head then :func:`reference_token_stats`; the ``[N, V]`` logits are materialized in ``dtype``."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return reference_token_stats(
        logits, targets, temperature=temperature, ignore_index=ignore_index, dtype=dtype, extras=extras
    )


def reference_clamped_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    top_p: float | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` restricted to its top-k, then top-p, head and renormalised; every token
    tied at the cut is kept; ``-inf`` logits never are. Autograd differentiates through the kept logits."""
    valid = targets != ignore_index
    u = _masked_logits(logits, valid, temperature, dtype)
    finite = torch.isfinite(u)
    with torch.no_grad():
        keep = finite.clone()
        if top_k is not None:
            ordered = u.sort(dim=-1, descending=True).values
            cut_k = ordered[..., min(int(top_k), u.shape[-1]) - 1 : min(int(top_k), u.shape[-1])]
            keep &= u >= cut_k
        if top_p is not None and float(top_p) < 1.0:
            kept_sorted = torch.where(keep, u, torch.full_like(u, float("-inf"))).sort(-1, descending=True).values
            probs = torch.softmax(kept_sorted, dim=-1)
            reached = probs.cumsum(-1) >= float(top_p)
            idx = torch.where(reached.any(-1), reached.to(dtype).argmax(-1), keep.sum(-1) - 1)
            keep &= u >= kept_sorted.gather(-1, idx.unsqueeze(-1))
    z = torch.where(keep, u, torch.full_like(u, float("-inf")))
    log_q = torch.log_softmax(z, dim=-1)
    q = log_q.exp()
    entropy = -(q * torch.where(keep, log_q, torch.zeros_like(log_q))).sum(-1)
    return torch.where(valid, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
