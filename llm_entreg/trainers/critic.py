"""The PPO critic: a value head, its optimizer stepped once per optimizer step, and its checkpoint file."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import TrainerCallback

from ..checkpoints import load_state_file

VALUE_STATE_FILE = "llm_entreg_value.pt"


class ValueHead(nn.Module):
    """A critic: a transformer backbone and a linear head giving one value per token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)


def value_head_from_policy(policy) -> ValueHead:
    """A critic initialised from the policy's backbone (InstructGPT initialises it from the reward model)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    return ValueHead(copy.deepcopy(base.base_model), base.config.get_text_config().hidden_size)


def check_value_model(value_model) -> None:
    """Refuse a value model that gives one value per sequence, naming what to use instead."""
    if "SequenceClassification" in type(value_model).__name__:
        raise ValueError(
            f"value_model: {type(value_model).__name__} gives one value per sequence; PPO needs per-token values: "
            "use AutoModelForTokenClassification(num_labels=1), or value_model=None for a value head on the policy"
        )
    num_labels = getattr(getattr(value_model, "config", None), "num_labels", 1)
    if "TokenClassification" in type(value_model).__name__ and num_labels != 1:
        raise ValueError(f"value_model: a token-classification head must have num_labels=1, got {num_labels}")


def per_token_values(value_model, input_ids, attention_mask) -> torch.Tensor:
    """``[B, L]`` values of a value model (a :class:`ValueHead` or a token classifier with one label)."""
    out = value_model(input_ids=input_ids, attention_mask=attention_mask)
    values = getattr(out, "logits", out)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)
    if values.ndim != 2 or values.shape != input_ids.shape:
        raise ValueError(
            f"value_model: expected one value per token, shape {tuple(input_ids.shape)} (or [..., 1]); got "
            f"{tuple(values.shape)}. A sequence-classification model gives one value per sequence: use "
            "AutoModelForTokenClassification(num_labels=1), or value_model=None for a value head on the policy."
        )
    return values


class Critic:
    """A value model prepared for this run's accelerator, with its own AdamW, stepped once per optimizer step."""

    def __init__(self, value_model: nn.Module, accelerator, lr: float, weight_decay: float, max_grad_norm: float):
        check_value_model(value_model)
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(value_model.parameters(), lr=lr, weight_decay=weight_decay)
        self.model = self._prepare(value_model)

    def _prepare(self, value_model: nn.Module) -> nn.Module:
        """DDP-wrapped under MULTI_GPU / MULTI_CPU, as is under DeepSpeed; under FSDP (whose ``prepare_model`` refuses
        a model outside ``accelerate.prepare()``) a plain replicated module on the device. Where it is not wrapped,
        :meth:`average_grads` all-reduces its gradients."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return value_model.to(self.accelerator.device)
        return self.accelerator.prepare_model(value_model)

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        return per_token_values(self.model, input_ids, attention_mask)

    def average_grads(self) -> None:
        """Average the gradients over the data-parallel ranks where nothing else does (DeepSpeed, FSDP): without it
        each rank would step its own critic on ``W x`` its local share of the globally normalized value loss."""
        if self.accelerator.num_processes == 1 or isinstance(self.model, nn.parallel.DistributedDataParallel):
            return
        import torch.distributed as dist

        for p in self.model.parameters():
            if p.requires_grad:
                if p.grad is None:  # every rank must take part in every all-reduce
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.accelerator.num_processes)

    def step(self) -> None:
        """One optimizer step of the critic on the gradients accumulated since the last one."""
        self.average_grads()
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"value_model": self.accelerator.unwrap_model(self.model).state_dict(),
                "value_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(state["value_model"])
        self.optimizer.load_state_dict(state["value_optimizer"])

    def save(self, folder: str, extra: dict) -> None:
        """Write the critic (and ``extra``, e.g. the KL controller) to ``folder``, atomically."""
        path = os.path.join(folder, VALUE_STATE_FILE)
        torch.save({**self.state_dict(), **extra}, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load(self, folder: str) -> dict:
        """Restore the critic from ``folder``; returns the whole saved state (for the extras)."""
        path = os.path.join(folder, VALUE_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing; a PPO checkpoint holds the critic and its optimizer")
        state = load_state_file(path, "critic state")
        try:
            self.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path}: corrupt or incompatible critic state ({exc})") from exc
        return state


class CriticStepCallback(TrainerCallback):
    """Steps the critic once per optimizer step (never per micro-batch)."""

    def __init__(self, critic: Critic):
        self.critic = critic

    def on_step_end(self, args, state, control, **kwargs):
        self.critic.step()
