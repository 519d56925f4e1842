"""EntropyDPOTrainer: TRL's DPO plus an entropy bonus next to DPO's implicit KL (β_DPO).

Only ``_compute_loss`` is wrapped: TRL's DPO loss is computed untouched, the per-token policy entropy that TRL's
own fused-head call already produced is captured (no second forward), and ``-β · agg(H)`` over the chosen, the
rejected or both completions is added. With ``entropy_coef=0`` (and no controller) the loss is TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as trl_dpo_module

from .config import EntropyRegularizationArguments, RunArguments
from .mixin import EntropyRegularizationMixin

ENTROPY_ON = ("chosen", "rejected", "both")


@dataclass
class EntropyDPOConfig(EntropyRegularizationArguments, RunArguments, DPOConfig):
    """``trl.DPOConfig`` plus the entropy-bonus fields (see :class:`EntropyRegularizationArguments`).

    Extra field:
        entropy_on: which completions the bonus is computed on: ``"chosen"``, ``"rejected"`` or ``"both"``
            (default). The bonus acts on the policy's entropy over those tokens; DPO's β keeps its usual meaning
            (the implicit KL-to-reference strength).
    """

    entropy_on: str = field(
        default="both", metadata={"help": "Completions the bonus sees: chosen, rejected or both (default)."}
    )

    def __post_init__(self):
        if self.entropy_on not in ENTROPY_ON:
            raise ValueError(f"entropy_on: expected one of {ENTROPY_ON}, got {self.entropy_on!r}")
        if self.entropy_level == "reward":
            raise ValueError("entropy_level: 'reward' has no meaning in DPO (no reward); use 'token' or 'sequence'")
        super().__post_init__()
        self.validate_entropy_arguments()


class EntropyDPOTrainer(EntropyRegularizationMixin, DPOTrainer):
    """``trl.DPOTrainer`` with an entropy bonus. Same constructor; ``args`` must be an :class:`EntropyDPOConfig`.

    Logs ``entropy`` (TRL's), ``entropy/chosen``, ``entropy/rejected``, ``entropy_coef`` and ``entropy_bonus``
    (the value of ``β · agg(H)`` on the micro-batch).
    """

    _name = "EntropyDPO"

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        if config is not None and not isinstance(config, EntropyDPOConfig):
            raise ValueError(f"args: expected an EntropyDPOConfig, got {type(config).__name__}")
        backend = config.fused_head_backend if config is not None else "auto"
        with self._our_fused_head(trl_dpo_module, backend):
            super().__init__(*args, **kwargs)
        self._entropy_setup()

    def _entropy_rows(self, batch_rows: int) -> slice:
        """Rows of a DPO batch (chosen first, then rejected) that the bonus sees."""
        half = batch_rows // 2
        return {"chosen": slice(0, half), "rejected": slice(half, None), "both": slice(None)}[self.args.entropy_on]

    def _entropy_mask(self, inputs) -> torch.Tensor:
        mask = inputs["completion_mask"][..., 1:].bool()
        return mask[self._entropy_rows(mask.shape[0])]

    def _compute_loss(self, model, inputs, return_outputs):
        with self._entropy_capture_window() as captured:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = (result if return_outputs else (result, None))
        if not captured:  # pragma: no cover - would mean TRL stopped calling the fused head
            raise RuntimeError("the fused LM head was not called; cannot read the policy entropy")
        policy_out = captured[0]  # the policy runs first; a PEFT reference pass (adapters disabled) may follow
        captured.clear()
        mode = "train" if self.model.training else "eval"
        completion = inputs["completion_mask"][..., 1:].bool()
        entropy = policy_out.entropy[:, -completion.shape[1]:]
        self._entropy_check_finite(loss, entropy, completion)
        half = completion.shape[0] // 2
        with torch.no_grad():
            for name, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
                h = (entropy[rows].detach() * completion[rows]).sum()
                n = completion[rows].sum()
                h, n = self.accelerator.gather_for_metrics(torch.stack([h.float(), n.float()]).reshape(1, 2)).sum(0)
                self._metrics[mode][f"entropy/{name}"].append((h / n).item() if n > 0 else 0.0)
        rows = self._entropy_rows(completion.shape[0])
        loss = loss + self._entropy_loss(entropy[rows], completion[rows], mode)
        return (loss, outputs) if return_outputs else loss
