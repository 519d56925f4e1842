"""The loss-fused policy loss of GRPO and PPO (``fused_loss=True``): TRL's per-token GRPO loss and our entropy term,
their gradient formed inside the LM head's forward (:func:`llm_entreg.ops.fused_linear_loss`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..losses import grpo_fused_token_loss, grpo_loss_weights


class FusedPolicyLossMixin:
    """Mix into a GRPOTrainer subclass after :class:`EntropyRegularizationMixin` and before ``GRPOTrainer``."""

    def _fused_policy_loss(self, model, inputs: dict[str, Any], mask: torch.Tensor, mode: str):
        """``(loss, logps, entropies)``: TRL's GRPO policy loss (with ``self.beta``'s k3 KL) plus our entropy term,
        the gradient formed inside the LM head's forward; ``logps``/``entropies`` ``[B, K]`` are detached.

        The per-token constants (advantage, old and reference log-probs, the loss type's weights from
        :func:`llm_entreg.losses.grpo_loss_weights`, the entropy term's weights) go to the fused head as
        ``fused_loss_fn``; TRL's metrics are then logged by TRL's own ``_compute_loss`` on the detached statistics.
        The caller sets the global counts (``_generation_window_counts``) first.
        """
        self._check_fused_inputs(model, inputs)
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        b, k = completion_ids.shape
        weights = grpo_loss_weights(mask, self.loss_type, accumulation_steps=self._loss_accumulation(mode),
                                    max_completion_length=self.max_completion_length,
                                    dapo_token_count=self._dapo_token_count(inputs, mode))
        entropy_on = self.entropy_bonus.entropy_level != "reward"
        ew, parts = self._entropy_token_weights(mask, mode) if entropy_on else (torch.zeros_like(weights), None)
        length = input_ids.shape[1] - 1  # the fused head scores the shifted labels [B, L-1]

        def grid(x):  # a [B, K] completion tensor on the [B, L-1] grid, flattened (prompt positions never read)
            full = torch.zeros(b, length, dtype=torch.float32, device=x.device)
            full[:, -k:] = x.float()
            return full.reshape(-1)

        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old, ref = inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        loss_fn = grpo_fused_token_loss(
            grid(mask), grid(weights), grid(advantages.expand(b, k)), None if old is None else grid(old),
            None if ref is None else grid(ref), grid(ew), clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, bias_correction_kl=self.args.use_bias_correction_kl,
        )
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-k] = -100
        mib = self.args.fused_loss_chunk_mib
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        fused_loss_fn=loss_fn, fused_loss_chunk_bytes=None if mib is None else mib * 2**20,
                        fused_loss_weight_grad=self._lean_weight_grad(model, mode))
        lp_det, ent_det = out.log_probs[:, -k:], out.entropy[:, -k:]
        self._entropy_check_finite(out.loss, ent_det, mask)
        self._log_policy_metrics(model, inputs, lp_det, ent_det)
        if entropy_on:
            self._entropy_weighted_metrics(ent_det, mask, mode, ew, parts)
        else:
            self._entropy_measure_only(ent_det, mask, mode)
        return out.loss, lp_det, ent_det

    def _lean_weight_grad(self, model, mode: str):
        """The head weight's own fp32 ``.grad`` for the op to accumulate into (no second ``[V, d]`` fp32 buffer), where
        that is exact: one process (no DDP/FSDP/DeepSpeed hooks to feed), an fp32 weight that trains, no fp16 loss
        scaling, training mode (GRPO's loss reaches the backward unscaled). Else None: the op's own buffer."""
        from accelerate.utils import DistributedType

        if mode != "train" or not torch.is_grad_enabled() or self.args.fp16:
            return None
        if self.accelerator.num_processes != 1 or self.accelerator.distributed_type != DistributedType.NO:
            return None
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.dtype != torch.float32 or not weight.requires_grad:
            return None
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        return weight.grad

    def _check_fused_inputs(self, model, inputs: dict[str, Any]) -> None:
        if self.aux_loss_enabled or any(inputs.get(k) is not None for k in ("pixel_values", "token_type_ids")):
            raise ValueError("fused_loss: MoE router aux loss and multimodal inputs are not supported; "
                             "set fused_loss=False")
        peft_config = getattr(self.accelerator.unwrap_model(model), "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):  # virtual tokens shift the head's label grid
            raise ValueError("fused_loss: PEFT prompt learning (virtual tokens) is not supported; use LoRA-style "
                             "adapters or set fused_loss=False")

    def _loss_accumulation(self, mode: str) -> int:
        return self.current_gradient_accumulation_steps if mode == "train" else 1

    def _dapo_token_count(self, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """TRL's dapo normalizer: the generation batch's token count per process, scaled to one micro-batch."""
        norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return norm

    def _log_policy_metrics(self, model, inputs: dict[str, Any], logps: torch.Tensor, entropies: torch.Tensor):
        """TRL's own GRPO metrics (KL, clip ratios, entropy), computed by its ``_compute_loss`` on given statistics."""
        self._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
        try:
            with torch.no_grad():
                super()._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
