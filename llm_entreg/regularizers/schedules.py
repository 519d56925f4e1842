"""Coefficient schedules: a pure ``value(step)`` of the optimizer step (never of micro-batches).

Warmup from 0 to ``entropy_coef``, then ``entropy_coef -> entropy_coef_end`` along the curve until
``entropy_schedule_steps``, then ``entropy_coef_end``. The fields carry the config's names; shapes and the reason for
warming up from 0: docs/tuning_beta.md ("Schedules").
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
    """Base: linear warmup from 0 to ``entropy_coef``, then ``entropy_coef -> entropy_coef_end``.

    Attributes:
        entropy_coef: value at the end of warmup (the peak). No default; literature: LM RL token-level bonus ~1e-4
            to 1e-3 decayed to 0; PPO 0.01.
        entropy_coef_end: value at ``entropy_schedule_steps`` and after. Default ``0.0``.
        entropy_schedule_steps: optimizer step at which ``entropy_coef_end`` is reached, ``>= 1`` (usually
            ``max_steps``).
        entropy_warmup_steps: ``0 <= entropy_warmup_steps <= entropy_schedule_steps``, default 0 (no warmup).
    """

    name: ClassVar[str] = "base"

    entropy_coef: float
    entropy_coef_end: float = 0.0
    entropy_schedule_steps: int = 1
    entropy_warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check_finite(self.entropy_coef, "entropy_coef")
        _check_finite(self.entropy_coef_end, "entropy_coef_end")
        _check_int(self.entropy_schedule_steps, "entropy_schedule_steps", 1)
        _check_int(self.entropy_warmup_steps, "entropy_warmup_steps", 0)
        if self.entropy_warmup_steps > self.entropy_schedule_steps:
            raise ValueError(
                f"entropy_warmup_steps: {self.entropy_warmup_steps} exceeds "
                f"entropy_schedule_steps={self.entropy_schedule_steps}"
            )

    def value(self, step: int) -> float:
        """Coefficient to use during optimizer step ``step`` (0-based). Pure: same step, same value."""
        _check_int(step, "step", 0)
        if step < self.entropy_warmup_steps:
            return self.entropy_coef * step / self.entropy_warmup_steps
        span = self.entropy_schedule_steps - self.entropy_warmup_steps
        p = 1.0 if span == 0 else min((step - self.entropy_warmup_steps) / span, 1.0)
        return self._curve(p, self.entropy_coef, self.entropy_coef_end)

    def _curve(self, p: float, start: float, end: float) -> float:  # p in [0, 1]
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.value(step)


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``entropy_coef`` at every step (after an optional warmup from 0); the end and the length are unused."""

    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _check_finite(self.entropy_coef, "entropy_coef")
        _check_int(self.entropy_warmup_steps, "entropy_warmup_steps", 0)

    def value(self, step: int) -> float:
        _check_int(step, "step", 0)
        if step < self.entropy_warmup_steps:
            return self.entropy_coef * step / self.entropy_warmup_steps
        return float(self.entropy_coef)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """``start + (end - start) * p``."""

    name: ClassVar[str] = "linear"

    def _curve(self, p: float, start: float, end: float) -> float:
        return start + (end - start) * p


@dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    """``start * (end / start) ** p``: a constant ratio per step; start and end non-zero, of the same sign."""

    name: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.entropy_coef == 0:
            raise ValueError("entropy_coef: must be non-zero for an exponential schedule")
        if self.entropy_coef_end == 0 or (self.entropy_coef_end > 0) != (self.entropy_coef > 0):
            raise ValueError(
                "entropy_coef_end: must be non-zero and of the same sign as entropy_coef for an exponential "
                f"schedule, got {self.entropy_coef_end}"
            )

    def _curve(self, p: float, start: float, end: float) -> float:
        if p >= 1.0:
            return float(end)
        return start * (end / start) ** p


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``end + (start - end) * (1 + cos(pi p)) / 2``: slow start, fast middle, slow finish."""

    name: ClassVar[str] = "cosine"

    def _curve(self, p: float, start: float, end: float) -> float:
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (ConstantSchedule, LinearSchedule, ExponentialSchedule, CosineSchedule)
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name (``constant``, ``linear``, ``exponential``, ``cosine``).

    ``kwargs`` are the fields ``entropy_coef``, ``entropy_coef_end``, ``entropy_schedule_steps``,
    ``entropy_warmup_steps`` (``constant`` also accepts ``value`` for ``entropy_coef``). Unknown names or fields
    raise ``ValueError`` naming them.
    """
    if name not in SCHEDULES:
        raise ValueError(f"entropy_schedule: unknown schedule {name!r}; choose from {tuple(SCHEDULES)}")
    cls = SCHEDULES[name]
    kwargs = dict(kwargs)
    if name == "constant" and "value" in kwargs:
        if "entropy_coef" in kwargs:
            raise ValueError("value: give either value or entropy_coef for a constant schedule, not both")
        kwargs["entropy_coef"] = kwargs.pop("value")
    allowed = [f.name for f in fields(cls)]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{key}: not a parameter of the {name!r} schedule; expected one of {allowed}")
    if "entropy_coef" not in kwargs:
        raise ValueError(f"entropy_coef: required for the {name!r} schedule")
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
