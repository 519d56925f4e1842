"""EntropyDPOTrainer: TRL's DPO plus an entropy bonus next to DPO's implicit KL (β_DPO), and H-DPO's α.

Only ``_compute_loss`` is wrapped: TRL's DPO loss is computed untouched, the per-token policy entropy that TRL's
own fused-head call already produced is captured (no second forward), and ``-β · agg(H)`` over the chosen, the
rejected or both completions is added. With ``entropy_coef=0`` (and no controller) the loss is TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as trl_dpo_module

from ..losses.dpo import DPO_FUSED_LOSS_TYPES
from .config import (FUSED_LOSS_ADVICE, EntropyRegularizationArguments, FusedLossArguments, RunArguments,
                     raise_first_unsupported)
from .fused_dpo import FusedDPOLossMixin
from .mixin import EntropyRegularizationMixin

ENTROPY_ON = ("chosen", "rejected", "both")


@dataclass
class EntropyDPOConfig(FusedLossArguments, EntropyRegularizationArguments, RunArguments, DPOConfig):
    """``trl.DPOConfig`` plus the entropy-bonus fields (see :class:`EntropyRegularizationArguments`).

    Extra fields:
        entropy_on: which completions the bonus is computed on: ``"chosen"``, ``"rejected"`` or ``"both"``
            (default). The bonus acts on the policy's entropy over those tokens; DPO's β keeps its usual meaning
            (the implicit KL-to-reference strength).
        hdpo_alpha: H-DPO's α (1.0: DPO). The logged ``rewards/*`` are then H-DPO's implicit rewards
            ``β(α log π - log π_ref)``; ``logps/*`` stay the policy's log-probs.
    """

    entropy_on: str = field(
        default="both", metadata={"help": "Completions the bonus sees: chosen, rejected or both (default)."}
    )
    hdpo_alpha: float = field(
        default=1.0,
        metadata={"help": "H-DPO (arXiv 2411.07595): the weight α of the entropy part of DPO's reverse-KL "
                  "regulariser; every policy log-prob in the DPO loss is multiplied by α, reference log-probs are "
                  "not. 1.0 (default) is DPO; < 1 sharpens (the paper: 0.9-0.95); > 1 flattens. Range > 0."},
    )

    def __post_init__(self):
        if self.entropy_on not in ENTROPY_ON:
            raise ValueError(f"entropy_on: expected one of {ENTROPY_ON}, got {self.entropy_on!r}")
        if isinstance(self.hdpo_alpha, bool) or not self.hdpo_alpha > 0:
            raise ValueError(f"hdpo_alpha: expected a number > 0, got {self.hdpo_alpha!r}")
        if self.hdpo_alpha != 1.0:
            loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
            if "sft" in loss_types or getattr(self, "use_weighting", False):
                raise ValueError("hdpo_alpha: H-DPO scales the policy log-probs of the preference term; it cannot be "
                                 "combined with loss_type 'sft' or use_weighting (they read the same log-probs)")
        if self.entropy_level == "reward":
            raise ValueError("entropy_level: 'reward' has no meaning in DPO (no reward); use 'token' or 'sequence'")
        super().__post_init__()
        self.validate_entropy_arguments()
        self.check_fused_dpo_supported()

    def check_fused_dpo_supported(self) -> None:
        """Raise ``ValueError`` naming the first setting the loss-fused DPO path does not form in the forward."""
        self.check_fused_loss_chunk_mib()
        if not self.fused_loss:
            return
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unsupported = {
            "loss_type": (not set(loss_types) <= set(DPO_FUSED_LOSS_TYPES), f"types in {DPO_FUSED_LOSS_TYPES}"),
            "f_divergence_type": (self.f_divergence_type != "reverse_kl", "'reverse_kl'"),
            "ld_alpha": (self.ld_alpha is not None, "None"),
            "use_weighting": (self.use_weighting, "False"),
            "padding_free": (getattr(self, "padding_free", False), "False"),
            **self.fused_loss_unsupported_clamp(),
            "entropy_bonus_top_quantile": (self.entropy_bonus_top_quantile != 1.0, "1.0"),
        }
        raise_first_unsupported(self, unsupported, "fused_loss=True", FUSED_LOSS_ADVICE)


class EntropyDPOTrainer(EntropyRegularizationMixin, FusedDPOLossMixin, DPOTrainer):
    """``trl.DPOTrainer`` with an entropy bonus. Same constructor; ``args`` must be an :class:`EntropyDPOConfig`.

    Logs ``entropy`` (TRL's), ``entropy/chosen``, ``entropy/rejected``, ``entropy_coef`` and ``entropy_bonus``
    (the value of ``β · agg(H)`` on the micro-batch).
    """

    _name = "EntropyDPO"

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is not None and not isinstance(config, EntropyDPOConfig):
            raise ValueError(f"args: expected an EntropyDPOConfig, got {type(config).__name__}")
        with self._our_fused_head(trl_dpo_module, config):
            super().__init__(*args, **kwargs)
        self._entropy_setup()

    def _entropy_capture(self, output) -> None:
        """The policy's fused output (the first of a loss computation): H-DPO scales its log-probs by α before TRL
        forms the DPO loss from them."""
        first = self._entropy_capturing and not self._entropy_captured
        super()._entropy_capture(output)
        if first and self.args.hdpo_alpha != 1.0:
            output["log_probs"] = output.log_probs * self.args.hdpo_alpha

    def _entropy_rows(self, batch_rows: int) -> slice:
        """Rows of a DPO batch (chosen first, then rejected) that the bonus sees."""
        half = batch_rows // 2
        return {"chosen": slice(0, half), "rejected": slice(half, None), "both": slice(None)}[self.args.entropy_on]

    def _entropy_mask(self, inputs) -> torch.Tensor:
        mask = inputs["completion_mask"][..., 1:].bool()
        return mask[self._entropy_rows(mask.shape[0])]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        completion = inputs["completion_mask"][..., 1:].bool()
        if self.args.fused_loss and not return_outputs:  # the gradient formed in the head's forward, by pairs
            loss, entropy = self._fused_dpo_loss(model, inputs, mode)
            self._after_trl_metrics(entropy, completion, mode)
            return loss
        with self._entropy_capture_window() as captured:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = (result if return_outputs else (result, None))
        if not captured:  # pragma: no cover - would mean TRL stopped calling the fused head
            raise RuntimeError("the fused LM head was not called; cannot read the policy entropy")
        policy_out = captured[0]  # the policy runs first; a PEFT reference pass (adapters disabled) may follow
        captured.clear()
        entropy = policy_out.entropy[:, -completion.shape[1]:]
        self._entropy_check_finite(loss, entropy, completion)
        self._after_trl_metrics(entropy, completion, mode)
        rows = self._entropy_rows(completion.shape[0])
        loss = loss + self._entropy_loss(entropy[rows], completion[rows], mode)
        return (loss, outputs) if return_outputs else loss

    def _after_trl_metrics(self, entropy: torch.Tensor, completion: torch.Tensor, mode: str) -> None:
        """Our metrics beside TRL's: the entropy of the chosen and the rejected completions; with H-DPO, TRL's
        α-scaled ``logps/*`` sums turned back into the log-probs themselves."""
        if self.args.hdpo_alpha != 1.0:
            for key in ("logps/chosen", "logps/rejected"):
                if self._metrics[mode].get(key):
                    self._metrics[mode][key][-1] /= self.args.hdpo_alpha
        half = completion.shape[0] // 2
        with torch.no_grad():
            for name, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
                h = (entropy[rows].detach() * completion[rows]).sum()
                n = completion[rows].sum()
                h, n = self.accelerator.gather_for_metrics(torch.stack([h.float(), n.float()]).reshape(1, 2)).sum(0)
                self._metrics[mode][f"entropy/{name}"].append((h / n).item() if n > 0 else 0.0)
