"""The loss-fused DPO path (``fused_loss=True`` on EntropyDPOConfig): TRL's DPO loss, H-DPO's α and our entropy
term, their gradient formed inside the LM head's forward by chunks of whole chosen/rejected pairs (6NdV).

TRL's metrics are then logged by TRL's own ``_compute_loss`` on the statistics the fused head returned (no second
policy pass). Derivation: docs/kernels.md ("Loss-fused DPO").
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from ..losses.dpo import dpo_fused_token_loss

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class FusedDPOLossMixin:
    """Mix into EntropyDPOTrainer after :class:`EntropyRegularizationMixin` and before ``DPOTrainer``."""

    def _fused_dpo_loss(self, model, inputs: dict[str, Any], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, detached entropy [rows, width])`` of one micro-batch (TRL's metrics and ours logged)."""
        completion = inputs["completion_mask"][..., 1:].bool()
        rows, width = completion.shape
        n_pairs = rows // 2
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        ref_chosen, ref_rejected = self._reference_sums(inputs, model_kwargs, labels, width)
        grid = torch.arange(rows, device=completion.device).unsqueeze(1).expand(rows, width)
        pair_of, is_chosen = (grid % n_pairs).reshape(-1), (grid < n_pairs).reshape(-1)
        lengths = torch.stack([completion[:n_pairs].sum(1), completion[n_pairs:].sum(1)], 1).float()
        mask = self._entropy_mask(inputs)
        ew, parts = self._entropy_token_weights(mask, mode)
        weights = torch.zeros(rows, width, dtype=ew.dtype, device=ew.device)
        weights[self._entropy_rows(rows)] = ew
        loss_fn = dpo_fused_token_loss(pair_of, is_chosen, ref_chosen, ref_rejected, lengths, weights.reshape(-1),
                                       beta=self.beta, loss_types=self.loss_types, loss_weights=self.loss_weights,
                                       alpha=self.args.hdpo_alpha)
        mib = self.args.fused_loss_chunk_mib
        out = model(**model_kwargs, labels=labels, fused_lm_head=True, fused_loss_fn=loss_fn,
                    fused_loss_groups=pair_of, fused_loss_chunk_bytes=None if mib is None else mib * 2**20)
        entropy = out.entropy[:, -width:]
        self._entropy_check_finite(out.loss, entropy, completion)
        self._log_dpo_metrics(inputs, out, ref_chosen, ref_rejected)
        rows_on = self._entropy_rows(rows)
        self._entropy_weighted_metrics(entropy[rows_on], mask, mode, ew, parts)
        return out.loss, entropy

    def _reference_sums(self, inputs, model_kwargs, labels, width: int):
        """The reference model's sequence log-prob sums of the chosen and the rejected completions."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:  # PEFT: the policy with its adapter off (or the "ref" adapter)
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                with use_adapter(unwrapped, adapter_name=name):
                    out = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
            else:
                out = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -width:].sum(1).chunk(2)

    def _log_dpo_metrics(self, inputs, out, ref_chosen, ref_rejected) -> None:
        """TRL's DPO metrics, by TRL's ``_compute_loss`` on the fused head's statistics (references given)."""
        alpha = self.args.hdpo_alpha
        stats = type(out)(loss=out.loss.detach(), label_mask=out.label_mask, aux_loss=None,
                          log_probs=out.log_probs * alpha, entropy=out.entropy, mean_logits=out.mean_logits,
                          is_top1=out.is_top1, log_sum_sq_probs=None)
        given = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        saved = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            with torch.no_grad():
                DPOTrainer._compute_loss(self, lambda **kwargs: stats, given, False)
        finally:
            self.precompute_ref_logps = saved
