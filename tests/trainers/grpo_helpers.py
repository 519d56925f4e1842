"""Shared set-up of the GRPO trainer tests: configs, trainers on the embedded default, one generation batch."""

from __future__ import annotations

import copy


def rl_fields(tmp_path, **kw):
    """Config fields TRL's GRPO and RLOO configs share: one step of 8 completions (4 per prompt) on the CPU."""
    base = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=8, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        disable_tqdm=True, bf16=False, beta=0.04, seed=0, gradient_checkpointing=False,
    )
    base.update(kw)
    return base


def grpo_fields(tmp_path, **kw):
    return rl_fields(tmp_path, **{"loss_type": "dapo", **kw})


def rl_trainer(cls, config_cls, model, default, fields: dict):
    """A trainer of ``cls`` on a copy of ``model`` and the embedded default's prompts and rewards."""
    return cls(model=copy.deepcopy(model), reward_funcs=default.reward_funcs, args=config_cls(**fields),
               train_dataset=default.prompts_train, processing_class=default.tokenizer)


def grpo_trainer(cls, config_cls, model, default, tmp_path, **kw):
    return rl_trainer(cls, config_cls, model, default, grpo_fields(tmp_path, **kw))


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def generation_batch(trainer):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batches = iter(trainer.get_train_dataloader())
    for _ in range(10):  # a generation batch whose groups do not all share one reward (else no policy gradient)
        inputs = trainer._prepare_inputs(next(batches))
        if inputs["advantages"].abs().sum() > 0:
            return inputs
    raise AssertionError("no generation batch with a non-zero advantage")
