"""Where the entropy coefficient comes from: constant, schedule, or a controller that reads the entropy.

Every source implements :class:`CoefficientSource`: ``value`` for every micro-batch of the current optimizer step,
``step(measured_entropy)`` once per optimizer step (the token-weighted global mean), and a ``state_dict`` of plain
values and tensors so a resumed run continues the same trajectory. Controllers: docs/formulations.md.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .entropy import check_entropy_coef
from .schedules import Schedule, make_schedule


def _finite(value: Any, field: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{field}: must be finite, got {value!r}")
    return v


def _entropy_value(measured_entropy: Any) -> float:
    if measured_entropy is None:
        raise ValueError("measured_entropy: this controller needs the mean entropy of the optimizer step")
    if isinstance(measured_entropy, torch.Tensor):
        measured_entropy = measured_entropy.detach().item()
    return _finite(measured_entropy, "measured_entropy")


class CoefficientSource(ABC):
    """Common interface of constant, scheduled and controlled coefficients (see the module docstring)."""

    #: Tag stored in ``state_dict()`` and checked by ``load_state_dict()``.
    kind: ClassVar[str] = "base"
    #: Whether :meth:`step` reads ``measured_entropy`` (a trainer may skip measuring it otherwise).
    needs_entropy: ClassVar[bool] = False

    num_steps: int = 0

    @property
    @abstractmethod
    def value(self) -> float:
        """Coefficient to apply during the current optimizer step."""

    @abstractmethod
    def step(self, measured_entropy: float | torch.Tensor | None = None) -> float:
        """Advance by one optimizer step; return the new :attr:`value`."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _check_kind(self, state: dict[str, Any]) -> None:
        got = state.get("kind")
        if got != self.kind:
            raise ValueError(f"state_dict: saved by a {got!r} coefficient, cannot load into {self.kind!r}")


class ConstantCoefficient(CoefficientSource):
    """The same coefficient at every step.

    Args:
        entropy_coef: default 0.0. ``>= 0`` unless ``allow_entropy_minimization``. Literature: PPO 0.01; LM RL
            ~0 to 1e-4.
    """

    kind = "constant"

    def __init__(self, entropy_coef: float = 0.0, *, allow_entropy_minimization: bool = False) -> None:
        coef = _finite(entropy_coef, "entropy_coef")
        check_entropy_coef(coef, allow_entropy_minimization)
        self._coef = coef
        self.num_steps = 0

    @property
    def value(self) -> float:
        return self._coef

    def step(self, measured_entropy: float | torch.Tensor | None = None) -> float:
        self.num_steps += 1
        return self._coef

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "entropy_coef": self._coef, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        self._coef = float(state["entropy_coef"])
        self.num_steps = int(state["num_steps"])


class ScheduledCoefficient(CoefficientSource):
    """``schedule.value(num_steps)``: the schedule evaluated at the number of optimizer steps taken."""

    kind = "schedule"

    def __init__(self, schedule: Schedule, *, allow_entropy_minimization: bool = False) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
        check_entropy_coef(schedule.entropy_coef, allow_entropy_minimization, field="entropy_coef")
        check_entropy_coef(schedule.entropy_coef_end, allow_entropy_minimization, field="entropy_coef_end")
        self.schedule = schedule
        self.num_steps = 0

    @property
    def value(self) -> float:
        return self.schedule.value(self.num_steps)

    def step(self, measured_entropy: float | torch.Tensor | None = None) -> float:
        self.num_steps += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schedule": self.schedule.name, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        if state["schedule"] != self.schedule.name:
            raise ValueError(
                f"state_dict: saved with a {state['schedule']!r} schedule, this one is {self.schedule.name!r}"
            )
        self.num_steps = int(state["num_steps"])


class TargetEntropyController(CoefficientSource):
    """Skywork-OR1's adaptive entropy control (He et al. 2025): keep the entropy near a target.

    After each optimizer step with measured mean entropy ``H``: ``c += delta`` if ``H < target``, ``c -= delta``
    if ``H > target`` (unchanged at equality), then ``c`` is clamped to ``[entropy_coef_min,
    entropy_coef_max]``. With ``only_below_target`` the bonus is applied only while the entropy is below the
    target: :attr:`value` is ``c`` if :meth:`applies` holds for the last measured entropy, else 0 -- and 0
    before the first measurement (as TRL's ``use_adaptive_entropy``). A trainer that gates on the entropy of
    the *current* batch instead (as Skywork-OR1's own code does) uses ``ctl.coef if ctl.applies(H_batch) else 0``.

    Args:
        entropy_coef: initial ``c``, default 0.0 (Skywork-OR1 starts the coefficient at 0 and lets it rise).
            Must lie in ``[entropy_coef_min, entropy_coef_max]``.
        entropy_target: target mean per-token entropy in nats, default 0.2 (Skywork-OR1). ``>= 0``.
        entropy_coef_delta: step ``delta``, default 0.005 (Skywork-OR1). ``> 0``.
        entropy_coef_min: lower clamp, default 0.0. ``>= 0`` unless ``allow_entropy_minimization``.
        entropy_coef_max: upper clamp, default 1.0 (TRL). ``>= entropy_coef_min``.
        only_below_target: default True (Skywork-OR1): apply the bonus only when ``H < entropy_target``.
        allow_entropy_minimization: default False; needed for a negative ``entropy_coef_min``.
    """

    kind = "target_entropy"
    needs_entropy = True

    def __init__(
        self,
        entropy_coef: float = 0.0,
        entropy_target: float = 0.2,
        entropy_coef_delta: float = 0.005,
        entropy_coef_min: float = 0.0,
        entropy_coef_max: float = 1.0,
        only_below_target: bool = True,
        *,
        allow_entropy_minimization: bool = False,
    ) -> None:
        self.entropy_target = _finite(entropy_target, "entropy_target")
        if self.entropy_target < 0:
            raise ValueError(f"entropy_target: must be >= 0 (nats), got {entropy_target}")
        self.entropy_coef_delta = _finite(entropy_coef_delta, "entropy_coef_delta")
        if self.entropy_coef_delta <= 0:
            raise ValueError(f"entropy_coef_delta: must be > 0, got {entropy_coef_delta}")
        self.entropy_coef_min = _finite(entropy_coef_min, "entropy_coef_min")
        self.entropy_coef_max = _finite(entropy_coef_max, "entropy_coef_max")
        check_entropy_coef(self.entropy_coef_min, allow_entropy_minimization, field="entropy_coef_min")
        if self.entropy_coef_max < self.entropy_coef_min:
            raise ValueError(
                f"entropy_coef_max: {entropy_coef_max} is below entropy_coef_min={entropy_coef_min}"
            )
        coef = _finite(entropy_coef, "entropy_coef")
        check_entropy_coef(coef, allow_entropy_minimization)
        if not self.entropy_coef_min <= coef <= self.entropy_coef_max:
            raise ValueError(
                f"entropy_coef: initial value {coef} outside [entropy_coef_min, entropy_coef_max] = "
                f"[{self.entropy_coef_min}, {self.entropy_coef_max}]"
            )
        self.coef = coef
        self.only_below_target = bool(only_below_target)
        self.last_entropy: float | None = None
        self.num_steps = 0

    def applies(self, measured_entropy: float | torch.Tensor | None) -> bool:
        """Whether the bonus applies given entropy ``H``: always without ``only_below_target``, else ``H < target``.

        ``None`` (nothing measured yet) counts as not below the target.
        """
        if not self.only_below_target:
            return True
        if measured_entropy is None:
            return False
        return _entropy_value(measured_entropy) < self.entropy_target

    @property
    def value(self) -> float:
        return self.coef if self.applies(self.last_entropy) else 0.0

    def step(self, measured_entropy: float | torch.Tensor | None = None) -> float:
        h = _entropy_value(measured_entropy)
        if h < self.entropy_target:
            self.coef += self.entropy_coef_delta
        elif h > self.entropy_target:
            self.coef -= self.entropy_coef_delta
        self.coef = min(max(self.coef, self.entropy_coef_min), self.entropy_coef_max)
        self.last_entropy = h
        self.num_steps += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "coef": self.coef,
            "last_entropy": self.last_entropy,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        self.coef = float(state["coef"])
        self.last_entropy = None if state["last_entropy"] is None else float(state["last_entropy"])
        self.num_steps = int(state["num_steps"])


class LearnedAlpha(CoefficientSource):
    """SAC-style learned temperature (Haarnoja et al. 2018): ``alpha = exp(log_alpha)`` tuned toward a target entropy.

    Each :meth:`step` takes one optimizer step of its own Adam on ``loss = log_alpha * (H - H*)``: the gradient
    is ``H - H*``, so ``log_alpha`` rises while the entropy is below the target and falls above it. Adam makes
    each step roughly ``lr`` in log space at first, whatever the entropy scale; its momentum (``beta1 = 0.9``)
    means ``alpha`` keeps moving for a few steps after the entropy crosses the target. :attr:`value` is the
    detached ``alpha`` -- the policy loss must not differentiate through it.

    Args:
        entropy_coef: initial ``alpha``, default 1e-3. ``> 0``. LM RL token-level bonuses are ~0 to 1e-4; 1e-3 is a
            deliberately high start that the controller can only lower toward the target.
        entropy_target: absolute target ``H*`` in nats (``>= 0``). SAC uses ``-|A|`` for continuous actions
            (``-dim(A)``), ``0.98 log|A|`` for discrete ones -- both meaningless for LM vocabularies, hence:
        entropy_target_ratio: ``H* = ratio * H_0`` with ``H_0`` the entropy measured on the first :meth:`step`; in
            ``(0, 1]``. Give at most one of the two; neither means ``ratio = 0.5``.
        entropy_alpha_lr: Adam learning rate on ``log_alpha``, default 1e-2 (a few hundred RL steps; SAC's 3e-4
            assumes ~1e6 environment steps). ``> 0``.
        min_alpha, max_alpha: optional clamps on ``alpha`` after each step (default none).
    """

    kind = "learned_alpha"
    needs_entropy = True

    def __init__(
        self,
        entropy_coef: float = 1e-3,
        entropy_target: float | None = None,
        entropy_target_ratio: float | None = None,
        entropy_alpha_lr: float = 1e-2,
        min_alpha: float | None = None,
        max_alpha: float | None = None,
    ) -> None:
        init_alpha = _finite(entropy_coef, "entropy_coef")
        if init_alpha <= 0:
            raise ValueError(f"entropy_coef: learned_alpha needs an initial alpha > 0 (alpha = exp(log_alpha)), "
                             f"got {entropy_coef}")
        if entropy_target is not None and entropy_target_ratio is not None:
            raise ValueError("entropy_target_ratio: give either entropy_target or entropy_target_ratio, not both")
        target_entropy = target_entropy_ratio = None
        if entropy_target is not None:
            target_entropy = _finite(entropy_target, "entropy_target")
            if target_entropy < 0:
                raise ValueError(f"entropy_target: must be >= 0 (nats), got {entropy_target}")
        else:
            ratio = 0.5 if entropy_target_ratio is None else _finite(entropy_target_ratio, "entropy_target_ratio")
            if not 0 < ratio <= 1:
                raise ValueError(f"entropy_target_ratio: must be in (0, 1], got {entropy_target_ratio}")
            target_entropy_ratio = ratio
        lr = _finite(entropy_alpha_lr, "entropy_alpha_lr")
        if lr <= 0:
            raise ValueError(f"entropy_alpha_lr: must be > 0, got {entropy_alpha_lr}")
        for name, bound in (("min_alpha", min_alpha), ("max_alpha", max_alpha)):
            if bound is not None and not _finite(bound, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {bound}")
        if min_alpha is not None and max_alpha is not None and max_alpha < min_alpha:
            raise ValueError(f"max_alpha: {max_alpha} is below min_alpha={min_alpha}")
        if (min_alpha is not None and init_alpha < min_alpha) or (max_alpha is not None and init_alpha > max_alpha):
            raise ValueError(f"entropy_coef: initial alpha {init_alpha} outside [min_alpha, max_alpha]")

        self.target_entropy: float | None = target_entropy
        self.target_entropy_ratio: float | None = target_entropy_ratio
        self.initial_entropy: float | None = None
        self.lr = lr
        self.min_alpha = min_alpha
        self.max_alpha = max_alpha
        self.log_alpha = torch.nn.Parameter(torch.tensor(math.log(init_alpha), dtype=torch.float64))
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=lr)
        self.num_steps = 0

    @property
    def value(self) -> float:
        return math.exp(self.log_alpha.item())

    def step(self, measured_entropy: float | torch.Tensor | None = None) -> float:
        h = _entropy_value(measured_entropy)
        if self.initial_entropy is None:
            self.initial_entropy = h
        if self.target_entropy is None:  # ratio mode: fix the target on the first measurement
            self.target_entropy = self.target_entropy_ratio * h
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.log_alpha * (h - self.target_entropy)
            loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            lo = -math.inf if self.min_alpha is None else math.log(self.min_alpha)
            hi = math.inf if self.max_alpha is None else math.log(self.max_alpha)
            self.log_alpha.clamp_(lo, hi)
        self.num_steps += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "log_alpha": self.log_alpha.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "target_entropy": self.target_entropy,
            "target_entropy_ratio": self.target_entropy_ratio,
            "initial_entropy": self.initial_entropy,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.target_entropy = state["target_entropy"]
        self.target_entropy_ratio = state["target_entropy_ratio"]
        self.initial_entropy = state["initial_entropy"]
        self.num_steps = int(state["num_steps"])


CONTROLLERS: dict[str, type[CoefficientSource]] = {
    "target_entropy": TargetEntropyController,
    "learned_alpha": LearnedAlpha,
}
#: Alternative controller names accepted by :func:`make_coefficient`.
CONTROLLER_ALIASES: dict[str, str] = {"skywork": "target_entropy", "adaptive": "target_entropy", "sac": "learned_alpha"}


def make_coefficient(
    entropy_coef: float = 0.0,
    *,
    entropy_schedule: str | None = None,
    entropy_coef_end: float = 0.0,
    entropy_schedule_steps: int | None = None,
    entropy_warmup_steps: int = 0,
    entropy_controller: str | None = None,
    entropy_target: float | None = None,
    entropy_target_ratio: float | None = None,
    entropy_coef_delta: float = 0.005,
    entropy_coef_min: float = 0.0,
    entropy_coef_max: float = 1.0,
    entropy_alpha_lr: float = 1e-2,
    allow_entropy_minimization: bool = False,
) -> CoefficientSource:
    """Build a :class:`CoefficientSource` from the config's entropy fields (same names, same meaning).

    - neither ``entropy_schedule`` nor ``entropy_controller``: :class:`ConstantCoefficient` (``entropy_coef``);
    - ``entropy_schedule`` (``constant``/``linear``/``exponential``/``cosine``): :class:`ScheduledCoefficient` from
      ``entropy_coef`` to ``entropy_coef_end`` over ``entropy_schedule_steps`` (required) after
      ``entropy_warmup_steps``;
    - ``entropy_controller="target_entropy"`` (aliases ``skywork``, ``adaptive``): :class:`TargetEntropyController`
      (``entropy_target`` default 0.2, ``entropy_coef_delta``, ``entropy_coef_min``, ``entropy_coef_max``);
    - ``entropy_controller="learned_alpha"`` (alias ``sac``): :class:`LearnedAlpha` with initial alpha
      ``entropy_coef`` (> 0), ``entropy_target`` or ``entropy_target_ratio``, ``entropy_alpha_lr``.

    A schedule and a controller cannot be combined; fields of the other kinds are ignored. Invalid values raise
    ``ValueError`` naming the field.
    """
    if entropy_schedule is not None and entropy_controller is not None:
        raise ValueError("entropy_controller: cannot combine a schedule and a controller; choose one")
    if entropy_schedule is not None:
        if entropy_schedule_steps is None:
            raise ValueError("entropy_schedule_steps: required for a schedule when max_steps is not set (> 0)")
        sched = make_schedule(
            entropy_schedule, entropy_coef=_finite(entropy_coef, "entropy_coef"), entropy_coef_end=entropy_coef_end,
            entropy_schedule_steps=entropy_schedule_steps, entropy_warmup_steps=entropy_warmup_steps,
        )
        return ScheduledCoefficient(sched, allow_entropy_minimization=allow_entropy_minimization)
    if entropy_controller is None:
        return ConstantCoefficient(entropy_coef, allow_entropy_minimization=allow_entropy_minimization)
    name = CONTROLLER_ALIASES.get(entropy_controller, entropy_controller)
    if name not in CONTROLLERS:
        raise ValueError(
            f"entropy_controller: unknown controller {entropy_controller!r}; choose from {tuple(CONTROLLERS)} "
            f"(aliases {sorted(CONTROLLER_ALIASES)})"
        )
    if name == "target_entropy":
        return TargetEntropyController(
            entropy_coef, 0.2 if entropy_target is None else entropy_target, entropy_coef_delta, entropy_coef_min,
            entropy_coef_max, allow_entropy_minimization=allow_entropy_minimization,
        )
    return LearnedAlpha(entropy_coef, entropy_target, entropy_target_ratio, entropy_alpha_lr)


__all__ = [
    "CONTROLLERS",
    "CONTROLLER_ALIASES",
    "CoefficientSource",
    "ConstantCoefficient",
    "LearnedAlpha",
    "ScheduledCoefficient",
    "TargetEntropyController",
    "make_coefficient",
]
