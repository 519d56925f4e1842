"""Coefficient schedules: a pure ``value(step)`` of the OPTIMIZER step.

``step`` counts optimizer steps already taken (0 for the first), never micro-batches or forward passes: every
micro-batch of one gradient-accumulation window must use the same coefficient, and the coefficient must not
depend on the GA setting. Trainers pass ``state.global_step``.

Shape of every schedule, with ``W = warmup_steps`` and ``N = total_steps``:

- warmup, ``0 <= step < W``: linear ramp **from 0** to ``start``, ``value = start * step / W`` (so ``value(0)
  = 0`` when ``W > 0``; the bonus fades in like a learning rate). Warmup from 0 was chosen over warmup from
  ``end`` because a regulariser switched on at full strength on a freshly initialised value head / untuned
  policy is the usual failure, and 0 is the same "off" for every schedule.
- decay, ``W <= step <= N``: progress ``p = (step - W) / (N - W)`` (``p = 1`` when ``N == W``) goes 0 -> 1 and
  the value goes ``start -> end`` along the schedule's curve;
- after ``N``: ``end``, forever.

Curves: ``constant`` (``start``, no decay), ``linear`` (``start + (end - start) p``), ``exponential``
(geometric interpolation ``start * (end / start) ** p``; ``start`` and ``end`` non-zero and of the same
sign), ``cosine`` (``end + (start - end) (1 + cos(pi p)) / 2``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar


def _check_int(value: Any, field: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{field}: must be an integer >= {minimum}, got {value!r}")


def _check_finite(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{field}: must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """Base: linear warmup from 0 to ``start`` over ``warmup_steps``, then ``start -> end`` until ``total_steps``.

    Attributes:
        start: value at the end of warmup (the peak). No default; literature: LM RL token-level bonus ~1e-4 to
            1e-3 decayed to 0; PPO 0.01.
        end: value at ``total_steps`` and after. Default ``0.0``.
        total_steps: optimizer step at which ``end`` is reached, ``>= 1``. Usually the run's ``max_steps``.
        warmup_steps: ``0 <= warmup_steps <= total_steps``, default 0 (no warmup).
    """

    name: ClassVar[str] = "base"

    start: float
    end: float = 0.0
    total_steps: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_finite(self.start, "start")
        _check_finite(self.end, "end")
        _check_int(self.total_steps, "total_steps", 1)
        _check_int(self.warmup_steps, "warmup_steps", 0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} exceeds total_steps={self.total_steps}")

    def value(self, step: int) -> float:
        """Coefficient to use during optimizer step ``step`` (0-based). Pure: same step, same value."""
        _check_int(step, "step", 0)
        if step < self.warmup_steps:
            return self.start * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        p = 1.0 if span == 0 else min((step - self.warmup_steps) / span, 1.0)
        return self._curve(p)

    def _curve(self, p: float) -> float:  # p in [0, 1]
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.value(step)


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``start`` at every step (after an optional warmup from 0). ``end`` and ``total_steps`` are unused."""

    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _check_finite(self.start, "start")
        _check_int(self.warmup_steps, "warmup_steps", 0)

    def value(self, step: int) -> float:
        _check_int(step, "step", 0)
        if step < self.warmup_steps:
            return self.start * step / self.warmup_steps
        return float(self.start)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """``start + (end - start) * p``."""

    name: ClassVar[str] = "linear"

    def _curve(self, p: float) -> float:
        return self.start + (self.end - self.start) * p


@dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    """``start * (end / start) ** p``: a constant ratio per step; ``start``, ``end`` non-zero, same sign."""

    name: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start == 0:
            raise ValueError("start: must be non-zero for an exponential schedule")
        if self.end == 0 or (self.end > 0) != (self.start > 0):
            raise ValueError(
                f"end: must be non-zero and of the same sign as start for an exponential schedule, got {self.end}"
            )

    def _curve(self, p: float) -> float:
        if p >= 1.0:
            return float(self.end)
        return self.start * (self.end / self.start) ** p


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``end + (start - end) * (1 + cos(pi p)) / 2``: slow start, fast middle, slow finish."""

    name: ClassVar[str] = "cosine"

    def _curve(self, p: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (ConstantSchedule, LinearSchedule, ExponentialSchedule, CosineSchedule)
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name (``constant``, ``linear``, ``exponential``, ``cosine``).

    ``kwargs`` are the dataclass fields ``start``, ``end``, ``total_steps``, ``warmup_steps``; ``constant``
    also accepts ``value`` for ``start``. Unknown names or fields raise ``ValueError`` naming them.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown schedule {name!r}; choose from {tuple(SCHEDULES)}")
    cls = SCHEDULES[name]
    kwargs = dict(kwargs)
    if name == "constant" and "value" in kwargs:
        if "start" in kwargs:
            raise ValueError("value: give either value or start for a constant schedule, not both")
        kwargs["start"] = kwargs.pop("value")
    allowed = [f.name for f in fields(cls)]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{key}: not a parameter of the {name!r} schedule; expected one of {allowed}")
    if "start" not in kwargs:
        raise ValueError(f"start: required for the {name!r} schedule")
    return cls(**kwargs)


__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LinearSchedule",
    "Schedule",
    "make_schedule",
]
