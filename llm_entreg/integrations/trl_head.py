"""A drop-in for TRL's fused LM head that runs on our ops.

TRL trainers call ``model(..., labels=labels, fused_lm_head=True)`` after ``trl.trainer.utils.add_fused_lm_head``
and read ``log_probs``, ``entropy`` (and, for DPO, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``).
:func:`install_fused_head` gives a model exactly those outputs (TRL's ``FusedCausalLMOutput``) through
:func:`llm_entreg.ops.linear_token_stats`, so TRL's trainers, and ours, run on our kernels. An optional
``on_output`` callback sees every fused output: that is how our trainers capture the differentiable per-token
entropy TRL already asks for, instead of running a second forward.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Callable

import torch

from ..ops import fused_linear_loss, gathered_params, linear_token_stats

_OUTPUT_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _logit_scale(text_config) -> float:
    """The multiplier a model applies to its logits before softmax (1.0 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def install_fused_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    backend: str = "auto",
    on_output: Callable | None = None,
    entropy_clamp_top_p: float | None = None,
    entropy_clamp_top_k: int | None = None,
) -> None:
    """Patch ``model.forward`` so that ``fused_lm_head=True`` returns per-token statistics from our op.

    Same contract as ``trl.trainer.utils.add_fused_lm_head`` (TRL 1.16): without ``fused_lm_head=True`` the original
    forward runs (generation is unchanged); with it the backbone runs, the head is applied in tiles to the
    positions whose next-token label is not ``-100``, and a ``FusedCausalLMOutput`` is returned, every per-token
    field zero where the label is ``-100``. Install before wrapping the model with PEFT.

    ``fused_loss_fn=`` (an extension, not in TRL's contract): a per-token loss ``(logprobs [n], entropy [n],
    rows [n]) -> [n]`` of the labelled positions, ``rows`` indexing the flattened ``[B, L-1]`` shifted-label grid.
    The head then runs :func:`llm_entreg.ops.fused_linear_loss` (the gradient is formed in the forward, 6NdV), the
    output's ``loss`` is the summed per-token loss, and ``log_probs``/``entropy`` are detached statistics.
    ``fused_loss_chunk_bytes=`` sets that op's ``chunk_budget_bytes`` (None: its default); ``fused_loss_groups=``
    (a group id per shifted-label position, e.g. the DPO pair) makes every chunk hold whole groups;
    ``fused_loss_weight_grad=`` accumulates the head weight's gradient into that fp32 tensor in the forward.

    Args:
        model: a causal LM (``PreTrainedModel``) with ``get_output_embeddings()``.
        temperature: the logits are divided by it (after the model's own logit scale).
        cast_lm_head_to_fp32: run the head in float32, outside autocast.
        outputs: which of ``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` to return
            (the others are ``None``); ``log_probs`` is always computed.
        backend: op backend (``auto``, ``chunked``, ``triton``, ``torch``).
        on_output: called as ``on_output(output)`` after every fused forward.
        entropy_clamp_top_p, entropy_clamp_top_k: return the clamped entropy (the top-k, then top-p, head
            renormalised) instead of the full one; not with ``fused_loss_fn``.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    effective_temperature = temperature / _checked_logit_scale(text_config, outputs)
    head_opts = {
        "temperature": effective_temperature, "backend": backend, "cast_fp32": cast_lm_head_to_fp32,
        "extras": tuple(o for o in ("mean_logits", "is_top1", "log_sum_sq_probs") if o in outputs),
        "clamp": (entropy_clamp_top_p, entropy_clamp_top_k),
    }  # fmt: skip
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      fused_loss_fn=None, fused_loss_chunk_bytes=None, fused_loss_groups=None,
                      fused_loss_weight_grad=None, **kw):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kw[key] = value
            return original_forward(*args, **kw)
        if labels is None and shift_labels is None:
            raise ValueError("labels: fused_lm_head=True needs labels (or shift_labels) to score")
        kw["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kw.setdefault("output_router_logits", True)
        backbone_out = self.base_model(*args, **kw)
        if shift_labels is None:
            hidden, labels = backbone_out.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = backbone_out.last_hidden_state, shift_labels
        fused = None if fused_loss_fn is None else (fused_loss_fn, fused_loss_chunk_bytes, fused_loss_groups,
                                                    fused_loss_weight_grad)
        fused_loss, stats, mask = _head_stats(self.get_output_embeddings(), hidden, labels, head_opts, fused)
        per_token = {
            "log_probs": stats.logprobs.view(mask.shape),
            "entropy": stats.entropy.view(mask.shape) if "entropy" in outputs else None,
            # the op saw T / scale, so these are statistics of logits * scale / T, as in TRL
            **{k: None if getattr(stats, k) is None else getattr(stats, k).view(mask.shape)
               for k in ("mean_logits", "is_top1", "log_sum_sq_probs")},
        }  # fmt: skip
        if fused_loss_fn is None:
            denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            loss = -per_token["log_probs"].sum() / denom
        else:
            loss = fused_loss
        aux_loss = _router_aux_loss(backbone_out, text_config, kw) if kw.get("output_router_logits") else None
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        out = FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **per_token)
        if on_output is not None:
            on_output(out)
        return out

    model.forward = types.MethodType(fused_forward, model)
    model._llm_entreg_fused_head = {"temperature": temperature, "outputs": tuple(outputs), "backend": backend,
                                    "entropy_clamp": (entropy_clamp_top_p, entropy_clamp_top_k)}


def _checked_logit_scale(text_config, outputs) -> float:
    """The model's logit multiplier, after refusing what the fused head cannot compute."""
    unknown = [o for o in outputs if o not in _OUTPUT_FIELDS]
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {unknown}; choose from {_OUTPUT_FIELDS}")
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            "final_logit_softcapping: models that soft-cap their logits (e.g. Gemma 2) are not supported by "
            "llm_entreg's fused head yet; use trl.trainer.utils.add_fused_lm_head for them"
        )
    scale = _logit_scale(text_config)
    if not scale > 0:
        raise ValueError(f"logit_scale: the model's logit multiplier must be > 0 for the fused head, got {scale}")
    return scale


def _head_stats(head, hidden, labels, opts: dict, fused):
    """``(fused loss or None, TokenStats, label mask)`` of the head on the labelled positions; ``fused`` is
    ``(loss_fn, chunk bytes, groups, weight_grad)`` for the loss-fused path, else None."""
    weight, bias = head.weight, head.bias
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather the head once
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    cast = opts["cast_fp32"]
    if cast:
        hidden = hidden.float()
    top_p, top_k = opts["clamp"]
    common = {"temperature": opts["temperature"], "ignore_index": -100, "backend": opts["backend"],
              "extras": opts["extras"]}
    with gathered_params(weight, bias), torch.autocast(hidden.device.type, enabled=False) if cast else nullcontext():
        weight_in = weight.float() if cast else weight
        bias_in = None if bias is None else (bias.float() if cast else bias)
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if fused is None:
            stats = linear_token_stats(flat_h, weight_in, flat_y, bias=bias_in, clamp_top_p=top_p,
                                       clamp_top_k=top_k, **common)
            return None, stats, mask
        if top_p is not None or top_k is not None:
            raise ValueError("fused_loss_fn: the loss-fused head computes the full entropy; no entropy clamp")
        loss_fn, chunk_bytes, groups, weight_grad = fused  # the loss's gradient is formed in this forward
        loss, stats = fused_linear_loss(flat_h, weight_in, flat_y, loss_fn, bias=bias_in,
                                        chunk_budget_bytes=chunk_bytes, groups=groups, weight_grad=weight_grad,
                                        **common)
        return loss, stats, mask


def _router_aux_loss(backbone_out, text_config, kw):
    """The mixture-of-experts load-balancing loss, as the model's own forward adds it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        backbone_out.router_logits,
        text_config.num_experts,
        text_config.num_experts_per_tok,
        kw.get("attention_mask"),
    )
