"""The sweep grid: parse the axes, take their product, name every trial. Pure functions, no I/O but YAML text.

Axes (each a list; the grid is their Cartesian product, in this order):

- ``entropy_coef`` -- β values, from a list (``0,1e-4,1e-3``) or a log range (``1e-4:1e-1`` with ``points``,
  log-spaced and inclusive of both ends, optionally with 0 prepended);
- ``schedule`` -- how β moves during training (:data:`SCHEDULE_CHOICES`): ``constant`` (no schedule, β fixed),
  ``linear`` / ``exponential`` / ``cosine`` (β decays from β to ``end_ratio`` x β over the run), or a controller
  ``target_entropy`` / ``learned_alpha`` (β is the controller's initial value);
- ``seed`` -- the recipe's top-level seed.

A trial id is ``coef=<β>_sched=<schedule>_seed=<seed>`` with β written in short scientific form (``1e-3``,
``3.16228e-3``, ``0``); it is stable across runs and machines and names the trial's output directory.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

# schedule axis value -> trainer overrides (entropy_schedule / entropy_controller); β decay end added separately
SCHEDULE_CHOICES = ("constant", "linear", "exponential", "cosine", "target_entropy", "learned_alpha")
DECAYING = ("linear", "exponential", "cosine")
CONTROLLERS = ("target_entropy", "learned_alpha")


class GridError(ValueError):
    """An axis specification is invalid; the message names the option."""


def _float(text: Any, what: str) -> float:
    if isinstance(text, bool):
        raise GridError(f"{what}: expected a number, got {text!r}")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise GridError(f"{what}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise GridError(f"{what}: expected a finite number, got {text!r}")
    return value


def _items(spec: Any) -> list:
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(spec, (list, tuple)):
        return list(spec)
    return [spec]


def _round(value: float) -> float:
    """Round to 12 significant digits so that 10 ** -3 prints and compares as 1e-3."""
    return float(f"{value:.12g}")


def parse_float_list(spec: Any, what: str = "--entropy-coef") -> list[float]:
    """``"0,1e-4,1e-3"`` or ``[0, 1e-4]`` -> ``[0.0, 0.0001, 0.001]``; duplicates removed, order kept."""
    values = [_round(_float(item, what)) for item in _items(spec)]
    if not values:
        raise GridError(f"{what}: empty list")
    return list(dict.fromkeys(values))


def parse_int_list(spec: Any, what: str = "--seeds") -> list[int]:
    out = []
    for item in _items(spec):
        try:
            if isinstance(item, bool) or float(item) != int(float(item)):
                raise ValueError
            out.append(int(float(item)))
        except (TypeError, ValueError):
            raise GridError(f"{what}: expected integers, got {item!r}") from None
    if not out:
        raise GridError(f"{what}: empty list")
    return list(dict.fromkeys(out))


def parse_schedules(spec: Any, what: str = "--schedules") -> list[str]:
    out = []
    for item in _items(spec):
        name = str(item).strip().lower()
        name = {"none": "constant", "null": "constant", "exp": "exponential", "sac": "learned_alpha",
                "skywork": "target_entropy", "adaptive": "target_entropy"}.get(name, name)
        if name not in SCHEDULE_CHOICES:
            raise GridError(f"{what}: unknown schedule {item!r}; choose from {', '.join(SCHEDULE_CHOICES)}")
        out.append(name)
    if not out:
        raise GridError(f"{what}: empty list")
    return list(dict.fromkeys(out))


def log_range(start: float, stop: float, points: int, include_zero: bool = False) -> list[float]:
    """``points`` log-spaced values from ``start`` to ``stop`` inclusive (``1e-4, 1e-1, 4`` -> 1e-4 .. 1e-1)."""
    start, stop = _float(start, "--log-range start"), _float(stop, "--log-range stop")
    if start <= 0 or stop <= 0:
        raise GridError(f"--log-range: both ends must be > 0 (got {start:g}:{stop:g}); add 0 with --include-zero")
    if isinstance(points, bool) or int(points) != points or points < 1:
        raise GridError(f"--points: expected an integer >= 1, got {points!r}")
    points = int(points)
    if points == 1:
        if start != stop:
            raise GridError(f"--points 1: needs start == stop, got {start:g}:{stop:g}")
        values = [start]
    else:
        lo, hi = math.log10(start), math.log10(stop)
        values = [_round(10 ** (lo + (hi - lo) * i / (points - 1))) for i in range(points)]
        values[0], values[-1] = _round(start), _round(stop)
    values = list(dict.fromkeys(values))
    return ([0.0] if include_zero else []) + values


def parse_log_range(spec: Any, points: int | None = None, include_zero: bool = False) -> list[float]:
    """``"1e-4:1e-1"`` (+ ``points``, default 4), or a mapping ``{start, stop, points, include_zero}``."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"start", "stop", "points", "include_zero"}
        if unknown:
            raise GridError(f"log_range: unknown key(s) {sorted(unknown)}; expected start, stop, points, include_zero")
        return log_range(spec.get("start"), spec.get("stop"), spec.get("points", points or 4),
                         bool(spec.get("include_zero", include_zero)))
    text = str(spec)
    if text.count(":") != 1:
        raise GridError(f"--log-range: expected START:STOP (e.g. 1e-4:1e-1), got {text!r}")
    a, b = text.split(":")
    return log_range(a, b, 4 if points is None else points, include_zero)


def format_coef(value: float) -> str:
    """Short scientific form used in trial ids and labels: 0 -> '0', 0.001 -> '1e-3', 0.02 -> '2e-2'."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.5e}".split("e")  # 6 significant digits
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def trial_id(coef: float, schedule: str, seed: int) -> str:
    return f"coef={format_coef(coef)}_sched={schedule}_seed={seed}"


@dataclass(frozen=True)
class TrialSpec:
    """One grid point: its id and the axis values (``schedule`` is one of :data:`SCHEDULE_CHOICES`)."""

    id: str
    entropy_coef: float
    schedule: str
    seed: int

    def params(self) -> dict[str, Any]:
        return {"entropy_coef": self.entropy_coef, "schedule": self.schedule, "seed": self.seed}


@dataclass
class Grid:
    """The axes; :meth:`trials` is their product (β = 0 keeps only one schedule: a decay of 0 is still 0)."""

    entropy_coef: list[float]
    schedules: list[str] = field(default_factory=lambda: ["constant"])
    seeds: list[int] = field(default_factory=lambda: [0])

    def trials(self) -> list[TrialSpec]:
        return build_trials(self.entropy_coef, self.schedules, self.seeds)


def build_trials(coefs, schedules, seeds) -> list[TrialSpec]:
    """Product of the axes in order (β outer, then schedule, then seed).

    A β of 0 under every schedule is the same run (a schedule or controller started at 0 stays at 0, and the
    exponential schedule and learned α cannot start at 0), so β = 0 appears once per seed, as ``constant``.
    """
    out, seen = [], set()
    for coef, schedule, seed in itertools.product(coefs, schedules, seeds):
        if coef == 0:
            schedule = "constant"
        tid = trial_id(coef, schedule, seed)
        if tid in seen:
            continue
        seen.add(tid)
        out.append(TrialSpec(tid, float(coef), schedule, int(seed)))
    return out


def schedule_overrides(schedule: str, coef: float, end_ratio: float) -> list[str]:
    """``key=value`` trainer overrides that put a trial on ``schedule`` starting at β = ``coef``."""
    if schedule == "constant":
        return ["entropy_schedule=null", "entropy_controller=null"]
    if schedule in DECAYING:
        return [f"entropy_schedule={schedule}", "entropy_controller=null", f"entropy_coef_end={_round(coef * end_ratio)!r}"]
    if schedule in CONTROLLERS:
        return ["entropy_schedule=null", f"entropy_controller={schedule}"]
    raise GridError(f"schedule: unknown {schedule!r}; choose from {', '.join(SCHEDULE_CHOICES)}")


def trial_overrides(trial: TrialSpec, end_ratio: float = 0.01) -> list[str]:
    """The overrides that make the base recipe into this trial (β, schedule, seed); output_dir is added by the runner."""
    return [f"entropy_coef={trial.entropy_coef!r}", *schedule_overrides(trial.schedule, trial.entropy_coef, end_ratio),
            f"seed={trial.seed}"]
