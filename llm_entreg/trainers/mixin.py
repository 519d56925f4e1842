"""EntropyRegularizationMixin: the plumbing every entropy-regularized trainer shares.

It installs our fused LM head (which also hands us the differentiable per-token entropy that TRL already asks
for, so no second forward runs), turns that entropy into the loss term with the pure functions of
:mod:`llm_entreg.regularizers`, normalizes it globally (over data-parallel ranks and gradient-accumulation
micro-batches), steps the coefficient once per optimizer step, logs, and saves/restores the coefficient state
with every checkpoint. The math lives in ``regularizers``; a trainer subclass only says which tokens count.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..ops import BACKENDS, install_fused_head
from ..regularizers import EntropyBonus, global_entropy_quantile_threshold, make_coefficient
from ..regularizers.aggregation import global_mean_loss_scale

STATE_FILE = "llm_entreg_state.pt"


class NonFiniteLossError(RuntimeError):
    """The loss or the policy entropy became NaN/inf; a checkpoint was saved before stopping."""


@dataclass
class EntropyRegularizationArguments:
    """Entropy-bonus fields shared by our trainer configs (mixed into the TRL config dataclasses)."""

    entropy_coef: float = field(
        default=0.0,
        metadata={
            "help": "Entropy bonus coefficient β (the initial α for a learned α). Default 0.0 (off). Range >= 0; "
            "< 0 only with allow_entropy_minimization. Literature: PPO 0.01; LM RL ~0 to 1e-4 token level; sweep "
            "it on a log scale."
        },
    )
    entropy_level: str = field(
        default="token",
        metadata={"help": "'token' (bonus on aggregated per-token entropies) or 'sequence' (per-sequence sum)."},
    )
    entropy_loss_agg_mode: str | None = field(
        default=None,
        metadata={
            "help": "Aggregation of the entropy term: token-mean (default at token level, global count over ranks "
            "and accumulation steps), seq-mean-token-mean, seq-mean-token-sum (default at sequence level), "
            "seq-mean-token-sum-norm."
        },
    )
    entropy_bonus_top_quantile: float = field(
        default=1.0,
        metadata={"help": "Only the top q fraction of tokens by entropy get the bonus. Default 1.0 (all); (0, 1]."},
    )
    entropy_schedule: str | None = field(
        default=None,
        metadata={"help": "β schedule per optimizer step: constant, linear, exponential, cosine. Default None."},
    )
    entropy_coef_end: float = field(default=0.0, metadata={"help": "β at the end of the schedule. Default 0.0."})
    entropy_schedule_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps over which β decays. Default: max_steps."}
    )
    entropy_warmup_steps: int = field(default=0, metadata={"help": "Linear warmup of β from 0. Default 0."})
    entropy_controller: str | None = field(
        default=None,
        metadata={
            "help": "'target_entropy' (Skywork-OR1 step controller) or 'learned_alpha' (SAC-style log α). "
            "Default None (constant or scheduled β)."
        },
    )
    entropy_target: float | None = field(
        default=None,
        metadata={
            "help": "Target mean per-token entropy in nats for a controller. target_entropy default 0.2 "
            "(Skywork-OR1); learned_alpha default: entropy_target_ratio x the initial entropy."
        },
    )
    entropy_target_ratio: float | None = field(
        default=None, metadata={"help": "learned_alpha: target = ratio x first measured entropy; (0, 1], default 0.5."}
    )
    entropy_coef_delta: float = field(
        default=0.005, metadata={"help": "target_entropy: step of β per optimizer step. Default 0.005 (Skywork-OR1)."}
    )
    entropy_coef_min: float = field(default=0.0, metadata={"help": "target_entropy: lower bound of β. Default 0."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "target_entropy: upper bound of β. Default 1."})
    entropy_alpha_lr: float = field(
        default=1e-2, metadata={"help": "learned_alpha: Adam learning rate on log α. Default 1e-2."}
    )
    allow_entropy_minimization: bool = field(
        default=False, metadata={"help": "Must be True for a negative entropy_coef (entropy minimization)."}
    )
    fused_head_backend: str = field(
        default="auto", metadata={"help": "Kernel backend for the fused LM head: auto, chunked, triton, torch."}
    )

    # The regularizers name their own parameters; a config user must read the config field instead.
    _FIELD_NAMES = {
        "loss_agg_mode": "entropy_loss_agg_mode",
        "top_entropy_quantile": "entropy_bonus_top_quantile",
        "entropy_level": "entropy_level",
        "schedule": "entropy_schedule",
        "start": "entropy_coef",
        "end": "entropy_coef_end",
        "total_steps": "entropy_schedule_steps",
        "warmup_steps": "entropy_warmup_steps",
        "controller": "entropy_controller",
        "target_entropy": "entropy_target",
        "target_entropy_ratio": "entropy_target_ratio",
        "init_alpha": "entropy_coef",
        "lr": "entropy_alpha_lr",
    }

    @contextmanager
    def _config_field_names(self):
        try:
            yield
        except ValueError as exc:
            name, sep, rest = str(exc).partition(":")
            if sep and name in self._FIELD_NAMES:
                raise ValueError(f"{self._FIELD_NAMES[name]}:{rest}") from exc
            raise

    def build_entropy_bonus(self) -> EntropyBonus:
        with self._config_field_names():
            return self._build_entropy_bonus()

    def _build_entropy_bonus(self) -> EntropyBonus:
        return EntropyBonus(
            entropy_coef=self.entropy_coef,
            entropy_level=self.entropy_level,
            loss_agg_mode=self.entropy_loss_agg_mode,
            top_entropy_quantile=self.entropy_bonus_top_quantile,
            allow_entropy_minimization=self.allow_entropy_minimization,
        )

    def build_entropy_coefficient(self, max_steps: int | None = None):
        with self._config_field_names():
            return self._build_entropy_coefficient(max_steps)

    def _build_entropy_coefficient(self, max_steps: int | None = None):
        schedule_kwargs = controller_kwargs = None
        if self.entropy_schedule is not None:
            total = self.entropy_schedule_steps or max_steps
            if not total or total <= 0:
                raise ValueError("entropy_schedule_steps: required when max_steps is not set (> 0)")
            schedule_kwargs = dict(end=self.entropy_coef_end, total_steps=total, warmup_steps=self.entropy_warmup_steps)
        if self.entropy_controller in ("target_entropy", "skywork", "adaptive"):
            controller_kwargs = dict(
                entropy_target=0.2 if self.entropy_target is None else self.entropy_target,
                entropy_coef_delta=self.entropy_coef_delta,
                entropy_coef_min=self.entropy_coef_min,
                entropy_coef_max=self.entropy_coef_max,
            )
        elif self.entropy_controller in ("learned_alpha", "sac"):
            controller_kwargs = dict(lr=self.entropy_alpha_lr)
            if self.entropy_target is not None and self.entropy_target_ratio is not None:
                raise ValueError("entropy_target_ratio: give entropy_target or entropy_target_ratio, not both")
            if self.entropy_target is not None:
                controller_kwargs["target_entropy"] = self.entropy_target
            else:
                controller_kwargs["target_entropy_ratio"] = self.entropy_target_ratio
        return make_coefficient(
            self.entropy_coef,
            schedule=self.entropy_schedule,
            schedule_kwargs=schedule_kwargs,
            controller=self.entropy_controller,
            controller_kwargs=controller_kwargs,
            allow_entropy_minimization=self.allow_entropy_minimization,
        )

    def validate_entropy_arguments(self) -> None:
        """Fail at construction, naming the field, rather than at the first training step."""
        if self.fused_head_backend not in BACKENDS:
            raise ValueError(f"fused_head_backend: expected one of {BACKENDS}, got {self.fused_head_backend!r}")
        self.build_entropy_bonus()
        max_steps = getattr(self, "max_steps", None)
        if self.entropy_schedule is not None and not self.entropy_schedule_steps and not (max_steps or 0) > 0:
            raise ValueError("entropy_schedule_steps: required for a schedule when max_steps is not set (> 0)")
        self.build_entropy_coefficient(max_steps if (max_steps or 0) > 0 else None)


class _StepCallback(TrainerCallback):
    """Steps the coefficient once per optimizer step (never per micro-batch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._entropy_end_of_step()


class EntropyRegularizationMixin:
    """Mix into a TRL trainer *before* it (``class T(EntropyRegularizationMixin, DPOTrainer)``).

    The subclass runs the parent's ``__init__`` inside :meth:`_our_fused_head`, then calls
    :meth:`_entropy_setup`; it calls :meth:`_entropy_loss` from its narrowest loss override, and implements
    :meth:`_entropy_mask` (which tokens of a batch the bonus sees).
    """

    # ------------------------------------------------------------------ set-up
    @contextmanager
    def _our_fused_head(self, trainer_module, backend: str, capture_outputs: bool = True):
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

        def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
            on_output = self._entropy_capture if (capture_outputs and not calls) else None
            calls.append(model)
            install_fused_head(
                model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs,
                backend=backend, on_output=on_output,
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
        self.entropy_coefficient = args.build_entropy_coefficient(args.max_steps if args.max_steps > 0 else None)
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
    def _entropy_loss(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """The term to add to the loss for this micro-batch (already scaled for the framework's reductions)."""
        term, scale, parts = self._entropy_term(entropy, mask, mode)
        self._entropy_metrics(entropy, mask, mode, term, parts)
        return term * scale

    def _entropy_term(self, entropy: torch.Tensor, mask: torch.Tensor, mode: str):
        """``(term, scale, parts)``: the unscaled ``-coef * agg(H)`` of this micro-batch, the framework scale, and
        what :meth:`_entropy_metrics` needs (coefficient, aggregation kwargs, quantile threshold). Logs nothing."""
        coef = self.entropy_coefficient.value
        mask = mask.bool()
        agg_kwargs, scale = self._global_aggregation(
            mode, entropy.device, self.entropy_bonus.agg_mode, use_global=self.entropy_bonus.top_entropy_quantile == 1.0
        )
        if self.entropy_bonus.agg_mode == "seq-mean-token-sum-norm":
            agg_kwargs["max_len"] = self._entropy_max_len(mask)
        threshold = None
        if self.entropy_bonus.top_entropy_quantile < 1.0:  # one threshold over every rank's tokens, as TRL's GRPO
            threshold = global_entropy_quantile_threshold(entropy, mask, self.entropy_bonus.top_entropy_quantile)
        term = self.entropy_bonus.loss_term(entropy, mask, coef, threshold=threshold, **agg_kwargs)
        return term, scale, (coef, agg_kwargs, threshold)

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

    def _global_aggregation(self, mode: str, device, agg_mode: str | None, use_global: bool = True):
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

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STATE_FILE)
        tmp = path + ".tmp"
        torch.save({"version": 1, "coefficient": self.entropy_coefficient.state_dict()}, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written state file

    def _entropy_load_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: missing; this checkpoint was not written by an llm_entreg trainer, or is incomplete"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            restored = self.args.build_entropy_coefficient(self.args.max_steps if self.args.max_steps > 0 else None)
            restored.load_state_dict(state["coefficient"])
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
            raise ValueError(f"{path}: corrupt or incompatible entropy-coefficient state ({exc})") from exc
        if restored.kind == "constant":
            # A constant β has no trajectory to continue: the configured value wins (a resumed run may change it)
            return
        self.entropy_coefficient = restored

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"resume_from_checkpoint: no checkpoint found in {self.args.output_dir}")
            if not os.path.isdir(resume_from_checkpoint):
                raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory")
            self._entropy_load_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)
