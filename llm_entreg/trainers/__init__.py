"""Thin subclasses of TRL trainers that add the entropy bonus; the math lives in ``llm_entreg.regularizers``."""

from .dpo import EntropyDPOConfig, EntropyDPOTrainer
from .grpo import EntropyGRPOConfig, EntropyGRPOTrainer
from .ppo import PPOConfig, PPOTrainer, ValueHead
from .mixin import EntropyRegularizationArguments, EntropyRegularizationMixin, NonFiniteLossError

__all__ = [
    "EntropyDPOConfig",
    "EntropyDPOTrainer",
    "EntropyGRPOConfig",
    "EntropyGRPOTrainer",
    "EntropyRegularizationArguments",
    "EntropyRegularizationMixin",
    "NonFiniteLossError",
    "PPOConfig",
    "PPOTrainer",
    "ValueHead",
]
