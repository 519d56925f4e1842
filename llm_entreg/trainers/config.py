"""The config fields our trainers add to TRL's configs: the entropy regularization and the loss-fused head.

Each field's help says its default, its range and the literature value; invalid values fail when the config is
built, naming the field. The math: docs/formulations.md; tuning: docs/tuning_beta.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import LOSS_TYPE_AGGREGATION
from ..ops import BACKENDS
from ..ops.clamped import check_clamp
from ..regularizers import CoefficientSource, EntropyBonus, make_coefficient

#: Config fields that :func:`llm_entreg.regularizers.make_coefficient` takes, under the same names.
COEFFICIENT_FIELDS = (
    "entropy_coef", "entropy_schedule", "entropy_coef_end", "entropy_warmup_steps", "entropy_controller",
    "entropy_target", "entropy_target_ratio", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max",
    "entropy_alpha_lr", "allow_entropy_minimization",
)
#: Config fields that :class:`llm_entreg.regularizers.EntropyBonus` takes, under the same names.
BONUS_FIELDS = ("entropy_coef", "entropy_level", "entropy_loss_agg_mode", "entropy_bonus_top_quantile",
                "allow_entropy_minimization")


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
    entropy_clamp_top_p: float | None = field(
        default=None,
        metadata={"help": "Clamped entropy (AEnt arXiv 2509.03493, SIREN 2509.25133): the policy entropy is that of "
                  "its top-p head, renormalised, for the bonus, the controllers and the logs. Default None (the "
                  "full entropy); range (0, 1]; the papers use about 0.9-0.95."},
    )
    entropy_clamp_top_k: int | None = field(
        default=None,
        metadata={"help": "Clamped entropy on the top-k head (applied before entropy_clamp_top_p). Default None; "
                  ">= 1. Tokens tied at the cut are all kept."},
    )

    def build_entropy_bonus(self) -> EntropyBonus:
        """The :class:`EntropyBonus` these fields describe."""
        return EntropyBonus(**{name: getattr(self, name) for name in BONUS_FIELDS})

    def build_entropy_coefficient(self, max_steps: int | None = None) -> CoefficientSource:
        """The coefficient source these fields describe; a schedule runs over ``entropy_schedule_steps`` or, when
        that is unset, ``max_steps``."""
        steps = self.entropy_schedule_steps or (max_steps if (max_steps or 0) > 0 else None)
        return make_coefficient(**{name: getattr(self, name) for name in COEFFICIENT_FIELDS},
                                entropy_schedule_steps=steps)

    def validate_entropy_arguments(self) -> None:
        """Fail at construction, naming the field, rather than at the first training step."""
        if self.fused_head_backend not in BACKENDS:
            raise ValueError(f"fused_head_backend: expected one of {BACKENDS}, got {self.fused_head_backend!r}")
        try:
            check_clamp(self.entropy_clamp_top_p, self.entropy_clamp_top_k)
        except ValueError as exc:
            raise ValueError(f"entropy_{exc}") from None
        self.build_entropy_bonus()
        self.build_entropy_coefficient(getattr(self, "max_steps", None))


@dataclass
class RunArguments:
    """Run-level fields of our configs that TrainingArguments (transformers 5) no longer has."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds one, deleting its run files and checkpoints "
                  "(other files stay). Default False: such a run stops with an error unless it resumes."},
    )


@dataclass
class FusedLossArguments:
    """``fused_loss``: the policy loss's gradient formed inside the LM head's forward (GRPO and PPO configs)."""

    fused_loss: bool = field(
        default=False,
        metadata={
            "help": "Form the gradient of the per-token loss (clipped surrogate, KL, entropy bonus) inside the LM "
            "head's forward pass (llm_entreg.ops.fused_linear_loss: 6NdV instead of 8NdV for the head). Same loss "
            "and gradients as the default path. Supported: loss_type grpo/bnpo/dr_grpo/dapo, token-level "
            "importance sampling, top_entropy_quantile = entropy_bonus_top_quantile = 1, no off-policy mask, no "
            "vLLM importance-sampling correction, text-only models without a router aux loss."
        },
    )

    fused_loss_chunk_mib: int | None = field(
        default=None,
        metadata={
            "help": "fused_loss: memory budget of one token chunk of the loss-fused head, in MiB (its fp32 logits "
            "and their dz). Default: 1024 on CUDA, 256 elsewhere. Larger chunks run faster and take more memory: on "
            "an H200 at 16384 tokens, d 4096, V 151936, the head's forward+backward took 112 ms at 1024 and 101 ms "
            "at 8192 (docs/benchmarks.md)."
        },
    )

    def check_fused_loss_chunk_mib(self) -> None:
        mib = self.fused_loss_chunk_mib
        if mib is not None and (isinstance(mib, bool) or not isinstance(mib, int) or mib < 1):
            raise ValueError(f"fused_loss_chunk_mib: expected a positive number of MiB or None, got {mib!r}")

    def fused_loss_unsupported_clamp(self) -> dict:
        """The clamp settings the loss-fused head cannot form (it computes the full entropy), for
        :func:`raise_first_unsupported`."""
        return {
            "entropy_clamp_top_p": (self.entropy_clamp_top_p is not None, "None"),
            "entropy_clamp_top_k": (self.entropy_clamp_top_k is not None, "None"),
        }

    def check_fused_loss_supported(self) -> None:
        """Raise ``ValueError`` naming the first setting that ``fused_loss=True`` does not support (GRPO, PPO)."""
        self.check_fused_loss_chunk_mib()
        if not self.fused_loss:
            return
        check_own_policy_loss_supported(self, "fused_loss=True", FUSED_LOSS_ADVICE, self.fused_loss_unsupported_clamp())


#: What a refused ``fused_loss=True`` setting tells the user to do.
FUSED_LOSS_ADVICE = "set fused_loss=False for the general path"


def raise_first_unsupported(config, unsupported: dict, feature: str, advice: str) -> None:
    """``unsupported``: field name -> (is the setting unsupported, the supported value in words); raise a
    ``ValueError`` naming the first unsupported one."""
    for name, (bad, wanted) in unsupported.items():
        if bad:
            raise ValueError(f"{name}: {feature} supports only {wanted}, got {getattr(config, name)!r} ({advice})")


def check_own_policy_loss_supported(config, feature: str, advice: str, extra: dict | None = None) -> None:
    """Raise ``ValueError`` naming the first setting that our own per-token GRPO policy loss (the loss-fused path,
    the covariance modes, entropy-shaped advantages) does not reproduce."""
    supported = tuple(LOSS_TYPE_AGGREGATION)
    unsupported = {
        "loss_type": (config.loss_type not in supported, f"one of {supported}"),
        "importance_sampling_level": (config.importance_sampling_level != "token", "'token'"),
        "top_entropy_quantile": (config.top_entropy_quantile != 1.0, "1.0"),
        "entropy_bonus_top_quantile": (config.entropy_bonus_top_quantile != 1.0, "1.0"),
        "off_policy_mask_threshold": (config.off_policy_mask_threshold is not None, "None"),
        "vllm_importance_sampling_correction": (
            config.use_vllm and config.vllm_importance_sampling_correction, "False (with use_vllm)"),
        **(extra or {}),
    }
    raise_first_unsupported(config, unsupported, feature, advice)
