"""EntropyRegularizationMixin: the plumbing every entropy-regularized trainer shares.

Our fused LM head (which hands over the differentiable per-token entropy TRL already asks for), the entropy term
from :mod:`llm_entreg.regularizers` with global normalizers, the coefficient stepped once per optimizer step, logs,
and the coefficient state in every checkpoint (``checkpointing.py``). A trainer subclass only says which tokens
count.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from ..integrations import install_fused_head
from ..regularizers import global_entropy_quantile_threshold, global_mean_loss_scale, token_weights

from .checkpointing import STATE_FILE, CheckpointStateMixin

__all__ = ["STATE_FILE", "EntropyRegularizationMixin", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss or the policy entropy became NaN/inf; a checkpoint was saved before stopping."""


class _StepCallback(TrainerCallback):
    """Steps the coefficient once per optimizer step (never per micro-batch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._entropy_end_of_step()


class EntropyRegularizationMixin(CheckpointStateMixin):
    """Mix into a TRL trainer *before* it (``class T(EntropyRegularizationMixin, DPOTrainer)``).

    The subclass runs the parent's ``__init__`` inside :meth:`_our_fused_head`, then calls
    :meth:`_entropy_setup`; it calls :meth:`_entropy_loss` from its narrowest loss override, and implements
    :meth:`_entropy_mask` (which tokens of a batch the bonus sees).
    """

    # ------------------------------------------------------------------ set-up
    @contextmanager
    def _our_fused_head(self, trainer_module, config, capture_outputs: bool = True):
        """While the TRL parent's ``__init__`` runs, its calls to ``add_fused_lm_head`` install our head instead.

        Same arguments, same place in TRL's set-up (before accelerate wraps the models for autocast), so the
        parent behaves exactly as it would with its own head. The first call patches the policy: only its
        outputs are captured for the bonus (unless ``capture_outputs`` is False: the subclass captures the entropy
        elsewhere).
        """
        self._entropy_captured = []
        self._entropy_capturing = False
        original = trainer_module.add_fused_lm_head
        calls = []

        backend = getattr(config, "fused_head_backend", "auto")
        clamp = (getattr(config, "entropy_clamp_top_p", None), getattr(config, "entropy_clamp_top_k", None))

        def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
            policy = not calls  # the first call patches the policy; the reference model's entropy is never used
            on_output = self._entropy_capture if (capture_outputs and policy) else None
            calls.append(model)
            install_fused_head(
                model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs,
                backend=backend, on_output=on_output, entropy_clamp_top_p=clamp[0] if policy else None,
                entropy_clamp_top_k=clamp[1] if policy else None,
            )

        trainer_module.add_fused_lm_head = add_fused_lm_head
        try:
            yield
        finally:
            trainer_module.add_fused_lm_head = original
        if not calls:
            raise RuntimeError(f"{trainer_module.__name__} did not call add_fused_lm_head; cannot capture entropy")

    def _entropy_setup(self) -> None:
        """Call at the end of ``__init__`` (after the parent's), inside nothing."""
        args = self.args
        self.entropy_bonus = args.build_entropy_bonus()
        self.entropy_coefficient = args.build_entropy_coefficient(args.max_steps)
        self._entropy_window_counts = None
        self._entropy_step_stats = torch.zeros(2, dtype=torch.float64)
        self.add_callback(_StepCallback(self))

    def _entropy_capture(self, output) -> None:
        if self._entropy_capturing:  # only inside the loss computation (not e.g. reference precomputation)
            self._entropy_captured.append(output)

    @contextmanager
    def _entropy_capture_window(self):
        """Collect the fused head's outputs while the parent computes one loss; yields the list."""
        self._entropy_captured.clear()
        self._entropy_capturing = True
        try:
            yield self._entropy_captured
        finally:
            self._entropy_capturing = False

    # ------------------------------------------------------------------ what subclasses provide
    #: Whether HF ``Trainer.training_step`` divides this trainer's loss by the GA steps (DPO: yes; GRPO: no, its
    #: loss is already scaled for gradient accumulation).
    _trainer_divides_loss_by_ga: bool = True
    #: Whether the global counts come from the data loader's accumulation window (:meth:`get_batch_samples`);
    #: trainers that generate their batches (GRPO) set ``_entropy_window_counts`` themselves instead.
    _counts_from_batch_samples: bool = True

    def _entropy_mask(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, T]`` mask (aligned with the fused head's per-token outputs) of the tokens the bonus sees."""
        raise NotImplementedError

    # ------------------------------------------------------------------ global normalizer
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and self._counts_from_batch_samples:
            masks = [self._entropy_mask(b).to(device) for b in batch_samples]
            tokens = sum(m.sum() for m in masks).to(torch.float64)
            seqs = torch.tensor(float(sum(m.shape[0] for m in masks)), dtype=torch.float64, device=device)
            both = self.accelerator.reduce(torch.stack([tokens, seqs]), reduction="sum")
            self._entropy_window_counts = (both[0], both[1])
        return batch_samples, num_items

    def _generation_window_counts(self, inputs: dict[str, Any], mask: torch.Tensor) -> None:
        """Global counts for trainers that generate their batches (GRPO, PPO).

        TRL's ``num_items_in_batch`` counts the loss tokens of the whole generation batch over all ranks; one
        optimizer step sees ``GA / steps_per_generation`` of it. Every rank holds the same number of rows.
        """
        ga = self.current_gradient_accumulation_steps
        tokens = inputs["num_items_in_batch"].double() * ga / self.args.steps_per_generation
        seqs = torch.tensor(float(mask.shape[0] * ga * self.accelerator.num_processes), dtype=torch.float64)
        self._entropy_window_counts = (tokens, seqs)

    @staticmethod
    def _completion_loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
        """The completion tokens a generated batch's loss uses (tool-call outputs excluded), as bool."""
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        return mask

    # ------------------------------------------------------------------ the loss term
    def _entropy_applied(self, loss: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, mode: str):
        """``loss`` plus the entropy term; at the reward level (the term is in the rewards) the entropy is only
        measured for the logs and the controllers."""
        if self.entropy_bonus.entropy_level != "reward":
            return loss + self._entropy_loss(entropy, mask, mode)
        self._entropy_measure_only(entropy, mask, mode)
        return loss

    def _entropy_loss(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """The term to add to the loss for this micro-batch (already scaled for the framework's reductions)."""
        term, scale, parts = self._entropy_term(entropy, mask, mode)
        self._entropy_metrics(entropy, mask, mode, term, parts)
        return term * scale

    def _entropy_term(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str):
        """``(term, scale, parts)``: the unscaled ``-coef * agg(H)`` of this micro-batch, the framework scale, and
        what :meth:`_entropy_metrics` needs (coefficient, aggregation kwargs, quantile threshold). Logs nothing."""
        coef, agg_kwargs, scale = self._entropy_aggregation(mask, mode)
        threshold = None
        q = self.entropy_bonus.entropy_bonus_top_quantile
        if q < 1.0:  # one threshold over every rank's tokens, as TRL's GRPO
            threshold = global_entropy_quantile_threshold(entropy, mask, q)
        term = self.entropy_bonus.loss_term(entropy, mask, coef, threshold=threshold, **agg_kwargs)
        return term, scale, (coef, agg_kwargs, threshold)

    def _entropy_aggregation(self, mask: torch.Tensor, mode: str):
        """``(coef, aggregate kwargs, framework scale)`` of this micro-batch's entropy term."""
        coef = self.entropy_coefficient.value
        use_global = self.entropy_bonus.entropy_bonus_top_quantile == 1.0
        agg_kwargs, scale = self._global_aggregation(mode, mask.device, use_global)
        if self.entropy_bonus.agg_mode == "seq-mean-token-sum-norm":
            agg_kwargs["max_len"] = self._entropy_max_len(mask)
        return coef, agg_kwargs, scale

    def _entropy_token_weights(self, mask: torch.Tensor, mode: str):
        """``(w, parts)``: per-token weights with ``(w * H).sum()`` = the scaled entropy term of this micro-batch
        (``entropy_bonus_top_quantile`` must be 1), and what :meth:`_entropy_metrics` needs."""
        coef, agg_kwargs, scale = self._entropy_aggregation(mask, mode)
        if coef == 0:
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device), (coef, agg_kwargs, None)
        weights = token_weights(mask.bool(), self.entropy_bonus.agg_mode, dtype=torch.float32, **agg_kwargs)
        return -coef * weights * scale, (coef, agg_kwargs, None)

    def _entropy_weighted_metrics(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str, ew: torch.Tensor,
                                  parts) -> None:
        """:meth:`_entropy_metrics` of the term formed with :meth:`_entropy_token_weights`' weights ``ew`` on
        ``entropy`` (the loss-fused paths), the framework scale taken back out."""
        term = (ew * entropy).sum() / self._entropy_aggregation(mask, mode)[2]
        self._entropy_metrics(entropy, mask, mode, term, parts)

    def _entropy_metrics(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str, term: torch.Tensor, parts):
        """Log the unscaled value of ``beta * agg(H)`` and accumulate the measured entropy for the controllers."""
        coef, agg_kwargs, threshold = parts
        mask = mask.bool()
        with torch.no_grad():
            h_sum = (entropy.detach().float() * mask).sum()
            n_tok = mask.sum()
            if "global_token_count" in agg_kwargs:
                # This micro-batch's share of the global aggregate (sum_local / N_global), summed over ranks and
                # x GA: the log's mean over the window's micro-batches is then beta * agg(H) over the global batch
                # of the optimizer step -- the same number at any world size / GA (a mean of per-rank means is not)
                ga = getattr(self, "current_gradient_accumulation_steps", 1)
                share = -term.detach().reshape(1) * ga
                bonus = self.accelerator.reduce(share, reduction="sum")
            else:
                local_bonus = -self.entropy_bonus.loss_term(entropy.detach(), mask, coef, threshold=threshold, **{
                    k: v for k, v in agg_kwargs.items() if k == "max_len"})
                bonus = self.accelerator.gather_for_metrics(local_bonus.reshape(1)).mean()
        self._entropy_record(h_sum, n_tok, coef, bonus.item(), mode)

    def _entropy_measure_only(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str) -> None:
        """Entropy in the reward: no loss term, but the controllers still step on the measured entropy, and the
        coefficient and ``α · H̄`` (global token mean) are logged."""
        with torch.no_grad():
            h_sum, n_tok = (entropy.detach().float() * mask).sum(), mask.sum()
            totals = self.accelerator.reduce(torch.stack([h_sum, n_tok.float()]), reduction="sum")
        coef = self.entropy_coefficient.value
        self._entropy_record(h_sum, n_tok, coef, coef * (totals[0] / totals[1].clamp(min=1)).item(), mode)

    def _entropy_record(self, h_sum: torch.Tensor, n_tok: torch.Tensor, coef: float, bonus: float, mode: str):
        """Log the coefficient and the bonus, and accumulate the measured entropy the controllers step on."""
        if mode == "train":
            self._entropy_step_stats += torch.stack([h_sum.detach().double().cpu(), n_tok.detach().double().cpu()])
        metrics = self._metrics[mode]
        metrics["entropy_coef"].append(float(coef))
        metrics["entropy_bonus"].append(float(bonus))

    def _global_aggregation(self, mode: str, device, use_global: bool = True):
        """``(aggregate kwargs, scale)`` that make a per-micro-batch term add up to the global aggregate.

        The framework later divides the loss by ``divisor`` and DDP averages over ranks. With global counts each
        micro-batch contributes ``sum_local / N_global``, scaled back up by ``W * divisor``; without them (eval, or
        a token set only known per micro-batch) the term is the micro-batch aggregate, averaged over the
        accumulation window like the parent's own loss.
        """
        ga = getattr(self, "current_gradient_accumulation_steps", 1) if mode == "train" else 1
        divisor = ga if self._trainer_divides_loss_by_ga else 1
        if mode == "train" and use_global and self._entropy_window_counts is not None:
            tokens, seqs = self._entropy_window_counts
            kwargs = {"global_token_count": tokens.to(device), "global_seq_count": seqs.to(device)}
            return kwargs, global_mean_loss_scale(self.accelerator.num_processes, framework_loss_divisor=divisor)
        return {}, divisor / ga

    def _entropy_max_len(self, mask: torch.Tensor) -> int:
        return int(getattr(self.args, "max_completion_length", None) or getattr(self.args, "max_length", None)
                   or mask.shape[1])

    def _entropy_check_finite(self, loss: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """Stop with the step number (after saving a checkpoint) if the loss or the entropy is NaN/inf."""
        with torch.no_grad():
            bad = (~torch.isfinite(loss.detach())).float() + (~torch.isfinite(entropy.detach()[mask.bool()])).any().float()
            bad = self.accelerator.reduce(bad.reshape(1).to(self.accelerator.device), reduction="sum")
        if bad.item() > 0:
            step = self.state.global_step
            where = ""
            if self.model.training:
                self._save_checkpoint(self.model, trial=None)
                where = f"; the weights of this step were saved to {os.path.join(self.args.output_dir, f'checkpoint-{step}')}"
            raise NonFiniteLossError(f"step {step}: the loss or the policy entropy is NaN/inf{where}")

    # ------------------------------------------------------------------ per optimizer step
    def _entropy_end_of_step(self) -> None:
        stats = self._entropy_step_stats.to(self.accelerator.device)
        stats = self.accelerator.reduce(stats, reduction="sum").cpu()
        self._entropy_step_stats = torch.zeros(2, dtype=torch.float64)
        measured = float(stats[0] / stats[1]) if stats[1] > 0 else None
        if measured is None and self.entropy_coefficient.needs_entropy:
            return
        self.entropy_coefficient.step(measured)
