"""The trainer registry (``trainers/__init__.py``): one name per algorithm for the CLI, the recipes and the run, and
the deprecated PPO names."""

from __future__ import annotations

import pytest
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from llm_entreg.recipes import config_class, trainer_fields
from llm_entreg.trainers import (ALGORITHMS, EntropyDPOConfig, EntropyDPOTrainer, EntropyGRPOConfig,
                                 EntropyGRPOTrainer, EntropyPPOConfig, EntropyPPOTrainer, EntropyRLOOConfig,
                                 EntropyRLOOTrainer, EntropySFTConfig, EntropySFTTrainer)


def test_registry_names_each_algorithm_once():
    assert {name: (a.config, a.trainer, a.inputs) for name, a in ALGORITHMS.items()} == {
        "dpo": (EntropyDPOConfig, EntropyDPOTrainer, "preferences"),
        "grpo": (EntropyGRPOConfig, EntropyGRPOTrainer, "rewards"),
        "ppo": (EntropyPPOConfig, EntropyPPOTrainer, "rewards"),
        "rloo": (EntropyRLOOConfig, EntropyRLOOTrainer, "rewards"),
        "sft": (EntropySFTConfig, EntropySFTTrainer, "demonstrations"),
    }
    from trl import RLOOTrainer, SFTTrainer

    assert issubclass(EntropyRLOOTrainer, RLOOTrainer) and issubclass(EntropySFTTrainer, SFTTrainer)
    assert issubclass(EntropyDPOTrainer, DPOTrainer) and issubclass(EntropyDPOConfig, DPOConfig)
    for algorithm in ("grpo", "ppo"):
        assert issubclass(ALGORITHMS[algorithm].trainer, GRPOTrainer)
        assert issubclass(ALGORITHMS[algorithm].config, GRPOConfig)


def test_recipes_take_their_configs_from_the_registry():
    for name, algorithm in ALGORITHMS.items():
        assert config_class(name) is algorithm.config
        assert {"entropy_coef", "entropy_schedule", "learning_rate"} <= trainer_fields(name)
    assert "kl_coef" in trainer_fields("ppo") and "kl_coef" not in trainer_fields("dpo")


def test_the_old_ppo_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="EntropyPPOTrainer"):
        from llm_entreg.trainers import PPOTrainer
    with pytest.warns(DeprecationWarning, match="EntropyPPOConfig"):
        from llm_entreg.trainers import PPOConfig
    assert PPOTrainer is EntropyPPOTrainer and PPOConfig is EntropyPPOConfig
    with pytest.raises(ImportError):
        from llm_entreg.trainers import NoSuchTrainer  # noqa: F401
