"""The PPO critic (``trainers/critic.py``): the value head, the value-model checks, preparation per distributed type,
one optimizer step per call, and its checkpoint file."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from llm_entreg.trainers.critic import VALUE_STATE_FILE, Critic, ValueHead, check_value_model, per_token_values


class _Backbone(nn.Module):
    def __init__(self, hidden=4, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)

    def forward(self, input_ids, attention_mask, use_cache=False):
        return types.SimpleNamespace(last_hidden_state=self.emb(input_ids))


def _accelerator(kind=DistributedType.NO, prepared=None):
    def prepare_model(model, *args, **kwargs):
        if prepared is not None:
            prepared.append(model)
        return model

    return types.SimpleNamespace(distributed_type=kind, device=torch.device("cpu"), num_processes=1,
                                 prepare_model=prepare_model, unwrap_model=lambda m: m)


def test_value_head_starts_at_zero_and_gives_one_value_per_token():
    head = ValueHead(_Backbone(), hidden_size=4)
    ids = torch.randint(0, 11, (2, 5))
    values = per_token_values(head, ids, torch.ones_like(ids))
    assert values.shape == (2, 5) and (values == 0).all()


def test_per_sequence_value_models_are_refused():
    class FakeSequenceClassification(nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(input_ids.shape[0], 1)

    with pytest.raises(ValueError, match="^value_model: FakeSequenceClassification gives one value per sequence"):
        check_value_model(FakeSequenceClassification())
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="^value_model: expected one value per token"):
        per_token_values(FakeSequenceClassification(), ids, ids)


def test_critic_is_prepared_per_distributed_type():
    """Under FSDP the critic is not handed to accelerate.prepare_model (FSDP2 refuses a model outside
    accelerate.prepare()): it stays a plain module on the device, and its gradients are all-reduced by the critic.
    Elsewhere prepare_model wraps it. (FSDP itself cannot run on a CPU: only the branch is checked here.)"""
    prepared = []
    model = ValueHead(_Backbone(), 4)
    critic = Critic(model, _accelerator(DistributedType.MULTI_GPU, prepared), lr=0.1, weight_decay=0.0,
                    max_grad_norm=1.0)
    assert critic.model is model and prepared == [model]
    prepared.clear()
    fsdp = Critic(model, _accelerator(DistributedType.FSDP, prepared), lr=0.1, weight_decay=0.0, max_grad_norm=1.0)
    assert fsdp.model is model and prepared == [] and next(fsdp.model.parameters()).device.type == "cpu"


def test_step_clips_steps_and_clears_the_gradients():
    model = ValueHead(_Backbone(), 4)
    critic = Critic(model, _accelerator(), lr=0.5, weight_decay=0.0, max_grad_norm=1e-3)
    ids = torch.randint(0, 11, (3, 4))
    returns = torch.full((3, 4), 10.0)
    ((critic.values(ids, torch.ones_like(ids)) - returns) ** 2).mean().backward()
    before = model.head.bias.detach().clone()
    critic.step()
    assert model.head.bias.grad is None  # zeroed (set to None) after the step
    # Adam's first step moves each parameter by ~lr in the direction that lowers the loss: the bias goes up
    assert model.head.bias.item() == pytest.approx(before.item() + 0.5, abs=1e-3)


def test_save_and_load_round_trip_and_a_corrupt_file_is_named(tmp_path):
    model = ValueHead(_Backbone(), 4)
    critic = Critic(model, _accelerator(), lr=0.1, weight_decay=0.0, max_grad_norm=0.0)
    with torch.no_grad():
        model.head.bias.fill_(1.25)
    critic.save(str(tmp_path), {"kl_controller": {"value": 0.3}})
    other = Critic(ValueHead(_Backbone(), 4), _accelerator(), lr=0.1, weight_decay=0.0, max_grad_norm=0.0)
    state = other.load(str(tmp_path))
    assert state["kl_controller"] == {"value": 0.3}
    assert other.model.head.bias.item() == 1.25
    (tmp_path / VALUE_STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=VALUE_STATE_FILE + ": corrupt critic state"):
        other.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=VALUE_STATE_FILE + ": missing"):
        other.load(str(tmp_path / "nowhere"))


class _Payload:
    """Unpickling this would create a file: the stand-in for code hidden in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_state_file_carrying_a_pickled_payload_is_refused_unrun(tmp_path):
    critic = Critic(ValueHead(_Backbone(), 4), _accelerator(), lr=0.1, weight_decay=0.0, max_grad_norm=0.0)
    witness = tmp_path / "payload_ran"
    torch.save({**critic.state_dict(), "kl_controller": {"value": 0.3}, "extra": _Payload(witness)},
               tmp_path / VALUE_STATE_FILE)
    with pytest.raises(ValueError, match=VALUE_STATE_FILE + ": refused: the critic state holds more than tensors"):
        critic.load(str(tmp_path))
    assert not witness.exists()
