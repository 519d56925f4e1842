"""Thin subclasses of TRL trainers that add the entropy regularizers, and :data:`ALGORITHMS`, the one registry of
recipe algorithm names that the CLI, the recipes and the run use. The math lives in ``regularizers`` and ``losses``.
"""

import warnings
from dataclasses import dataclass

from .config import EntropyRegularizationArguments, FusedLossArguments, RunArguments
from .critic import ValueHead
from .dpo import EntropyDPOConfig, EntropyDPOTrainer
from .grpo import EntropyGRPOConfig, EntropyGRPOTrainer
from .mixin import EntropyRegularizationMixin, NonFiniteLossError
from .policy_loss import PolicyLossArguments
from .ppo import EntropyPPOConfig, EntropyPPOTrainer
from .rloo import EntropyRLOOConfig, EntropyRLOOTrainer
from .sft import EntropySFTConfig, EntropySFTTrainer


@dataclass(frozen=True)
class Algorithm:
    """A recipe algorithm: its config and trainer classes, and what the trainer is built from besides the model.

    ``inputs``: ``"preferences"`` (a preference dataset and a reference model: DPO), ``"rewards"`` (a prompt
    dataset and reward functions: GRPO, PPO, RLOO) or ``"demonstrations"`` (prompt-completion examples: SFT).
    """

    config: type
    trainer: type
    inputs: str


ALGORITHMS: dict[str, Algorithm] = {
    "dpo": Algorithm(EntropyDPOConfig, EntropyDPOTrainer, "preferences"),
    "grpo": Algorithm(EntropyGRPOConfig, EntropyGRPOTrainer, "rewards"),
    "ppo": Algorithm(EntropyPPOConfig, EntropyPPOTrainer, "rewards"),
    "rloo": Algorithm(EntropyRLOOConfig, EntropyRLOOTrainer, "rewards"),
    "sft": Algorithm(EntropySFTConfig, EntropySFTTrainer, "demonstrations"),
}

_DEPRECATED = {"PPOTrainer": EntropyPPOTrainer, "PPOConfig": EntropyPPOConfig}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"llm_entreg.trainers.{name} is deprecated and will be removed in the next release; use "
                      f"{new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "EntropyDPOConfig",
    "EntropyDPOTrainer",
    "EntropyGRPOConfig",
    "EntropyGRPOTrainer",
    "EntropyPPOConfig",
    "EntropyPPOTrainer",
    "EntropyRLOOConfig",
    "EntropyRLOOTrainer",
    "EntropySFTConfig",
    "EntropySFTTrainer",
    "EntropyRegularizationArguments",
    "EntropyRegularizationMixin",
    "FusedLossArguments",
    "NonFiniteLossError",
    "PolicyLossArguments",
    "RunArguments",
    "ValueHead",
]
