"""The embedded default inside TRL 1.16's own trainers: DPO preprocessing and GRPO's reward-function call."""

from __future__ import annotations

import copy

import pytest

from llm_entreg.tasks import build_datasets, build_tiny_model, correctness_reward, format_reward

pytestmark = pytest.mark.slow

COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, seed=0)


def test_dpo_trainer_tokenizes_and_trains(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    data = build_datasets(n_preference=16).preference["train"]
    model = build_tiny_model(tokenizer, hidden_size=16, layers=1, heads=2)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1, **COMMON)
    # An in-memory model has no path TRL could load the reference from: pass it.
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] == tokenizer(data[0]["prompt"])["input_ids"]
    assert row["chosen_ids"] == tokenizer(data[0]["chosen"])["input_ids"][1:] + [tokenizer.eos_token_id]
    assert row["rejected_ids"][-1] == tokenizer.eos_token_id and row["rejected_ids"] != row["chosen_ids"]
    trainer.train()
    assert trainer.state.global_step == 2


def test_grpo_trainer_calls_rewards(tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return correctness_reward(prompts, completions, **kwargs)

    data = build_datasets(n_prompts=8).prompts["train"]
    model = build_tiny_model(tokenizer, hidden_size=16, layers=1, heads=2)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_steps=1,
                      max_completion_length=6, logging_steps=1, **COMMON)
    trainer = GRPOTrainer(model=model, reward_funcs=[spy, format_reward], args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    assert len(seen["completions"]) == len(seen["answer"]) == len(seen["task"]) == len(seen["prompts"]) == 4
    assert all(isinstance(c, str) and "<eos>" not in c for c in seen["completions"])
    assert all(p.endswith("=") for p in seen["prompts"])


def test_dpo_trainer_from_cached_path(tiny_cache, tmp_path):
    """A trainer given only the warm start's path loads model, reference and tokenizer from it (AutoTokenizer)."""
    from trl import DPOConfig, DPOTrainer

    _, config, path = tiny_cache
    data = build_datasets(config.task, config.seed, n_preference=8).preference["train"]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, **COMMON)
    trainer = DPOTrainer(model=str(path), args=args, train_dataset=data)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"][0] == 2 and row["chosen_ids"][-1] == 3
    assert trainer.processing_class.decode(row["prompt_ids"], skip_special_tokens=True) == data[0]["prompt"]
    trainer.train()
