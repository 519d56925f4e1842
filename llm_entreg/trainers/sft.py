"""EntropySFTTrainer: TRL's SFT plus an entropy term on the trained tokens, the confidence penalty of Pereyra et al.
(arXiv 1701.06548): ``loss = CE - β · agg(H)``.

Only ``compute_loss`` is wrapped: TRL's SFT loss is computed untouched, the per-token entropy TRL's own fused-head
call already produced is captured, and the term is added over the tokens the loss trains (``labels != -100``). An
optional dataset column ``entropy_mask`` (0/1 per example) limits it to some examples, e.g. the pseudo-labelled ones
of :mod:`llm_entreg.pseudo_label`. With ``entropy_coef=0`` the loss is TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer import sft_trainer as trl_sft_module

from .config import (FUSED_LOSS_ADVICE, EntropyRegularizationArguments, FusedLossArguments, RunArguments,
                     raise_first_unsupported)
from .mixin import EntropyRegularizationMixin

#: The optional per-example dataset column (0/1): whether the example's trained tokens get the entropy term.
ENTROPY_MASK_COLUMN = "entropy_mask"


@dataclass
class EntropySFTConfig(FusedLossArguments, EntropyRegularizationArguments, RunArguments, SFTConfig):
    """``trl.SFTConfig`` plus the entropy fields (see :class:`EntropyRegularizationArguments`) and ``fused_loss``
    (the cross-entropy and the penalty formed in the head's forward)."""

    def __post_init__(self):
        if self.entropy_level == "reward":
            raise ValueError("entropy_level: 'reward' has no meaning in SFT (no reward); use 'token' or 'sequence'")
        super().__post_init__()
        self.validate_entropy_arguments()
        self.check_fused_loss_chunk_mib()
        if self.fused_loss:
            unsupported = {"loss_type": (self.loss_type != "nll", "'nll'"),
                           "label_smoothing_factor": (self.label_smoothing_factor != 0, "0"),
                           **self.fused_loss_unsupported_clamp(),
                           "entropy_bonus_top_quantile": (self.entropy_bonus_top_quantile != 1.0, "1.0")}
            raise_first_unsupported(self, unsupported, "fused_loss=True", FUSED_LOSS_ADVICE)


class EntropySFTTrainer(EntropyRegularizationMixin, SFTTrainer):
    """``trl.SFTTrainer`` with the confidence penalty. Same constructor; ``args`` must be an
    :class:`EntropySFTConfig`. Logs TRL's metrics plus ``entropy_coef`` and ``entropy_bonus``."""

    _name = "EntropySFT"

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is None or not isinstance(config, EntropySFTConfig):
            raise ValueError(f"args: expected an EntropySFTConfig, got {type(config).__name__}")
        self._loss_divided_by_ga = True
        dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        columns = getattr(dataset, "column_names", None) or []
        if ENTROPY_MASK_COLUMN in columns and (config.packing or config.padding_free):
            raise ValueError(f"{ENTROPY_MASK_COLUMN}: a per-example entropy mask needs one example per row; "
                             "packing / padding-free rows mix examples (set packing=False, padding_free=False)")
        with self._our_fused_head(trl_sft_module, config):
            super().__init__(*args, **kwargs)
        self.data_collator = _KeepEntropyMask(self.data_collator)
        self._entropy_setup()

    @property
    def _trainer_divides_loss_by_ga(self) -> bool:
        """Whether the HF Trainer divides this step's loss by the accumulation steps (decided as it does: not when
        the loss was normalized by ``num_items_in_batch``)."""
        return self._loss_divided_by_ga

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ENTROPY_MASK_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ENTROPY_MASK_COLUMN]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None
        self._loss_divided_by_ga = not scaled
        return batch_samples, num_items

    def _entropy_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        mask = inputs["labels"][..., 1:] != -100
        rows = inputs.get(ENTROPY_MASK_COLUMN)
        return mask if rows is None else mask & rows.to(mask.device).bool().reshape(-1, 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ENTROPY_MASK_COLUMN, None)  # not a model input
        mask = self._entropy_mask({**inputs, ENTROPY_MASK_COLUMN: rows})
        if self.args.fused_loss and not return_outputs and self.compute_loss_func is None:
            return self._fused_sft_loss(model, inputs, mask, num_items_in_batch)
        with self._entropy_capture_window() as captured:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if not captured:  # pragma: no cover - would mean TRL stopped calling the fused head
            raise RuntimeError("the fused LM head was not called; cannot read the policy entropy")
        entropy = captured[0].entropy
        captured.clear()
        mode = "train" if self.model.training else "eval"
        self._entropy_check_finite(loss, entropy, mask)
        loss = loss + self._entropy_loss(entropy, mask, mode)
        return (loss, outputs) if return_outputs else loss


    def _fused_sft_loss(self, model, inputs, mask, num_items_in_batch) -> torch.Tensor:
        """TRL's SFT loss (the token-summed NLL over ``num_items_in_batch``) and the penalty, their gradient formed in
        the head's forward; TRL's metrics by TRL's ``compute_loss`` on the fused head's statistics."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        valid = labels[..., 1:] != -100
        denom = torch.as_tensor(valid.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
        scale = 1.0 / denom.to(torch.float64)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        ew, parts = self._entropy_token_weights(mask, mode)
        ew_flat = ew.reshape(-1)

        def loss_fn(lp, ent, positions):
            return -lp * scale.to(lp.dtype) + ew_flat[positions].to(lp.dtype) * ent

        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        mib = self.args.fused_loss_chunk_mib
        out = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True, fused_loss_fn=loss_fn,
                    fused_loss_chunk_bytes=None if mib is None else mib * 2**20)
        self._entropy_check_finite(out.loss, out.entropy, mask)
        with torch.no_grad():
            SFTTrainer.compute_loss(self, lambda **kw: out, dict(inputs), False, num_items_in_batch)
        self._entropy_weighted_metrics(out.entropy, mask, mode, ew, parts)
        return out.loss


class _KeepEntropyMask:
    """The data collator, passing each example's ``entropy_mask`` on as a ``[B]`` tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        flags = [example.pop(ENTROPY_MASK_COLUMN, None) for example in examples]
        batch = self.collator(examples)
        if any(flag is not None for flag in flags):
            batch[ENTROPY_MASK_COLUMN] = torch.tensor([1 if flag is None else int(flag) for flag in flags])
        return batch

    def __getattr__(self, name):  # the collator's own attributes (e.g. return_position_ids)
        return getattr(self.collator, name)
