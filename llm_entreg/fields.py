"""Typed values for config dataclass fields: check a recipe's trainer section against the field types before any
model loads, and list every field (``llm-entreg fields ALGORITHM``)."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, Union

_SCALARS = {float: "a float", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}


class FieldTypeError(ValueError):
    """A value does not fit a field's type; the message says what was expected."""


def _arms(tp) -> tuple:
    """The alternatives of a Union (``X | Y``, ``Optional[X]``), else ``(tp,)``; beside an Enum, ``str`` is dropped
    (``SchedulerType | str``: the string must name a member)."""
    arms = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in arms):
        arms = tuple(a for a in arms if a is not str)
    return arms


def describe(tp) -> str:
    """What a field of type ``tp`` expects, in words (``a float or null``)."""
    words = []
    arms = _arms(tp)
    for arm in arms:
        origin = typing.get_origin(arm)
        if arm in _SCALARS:
            words.append(_SCALARS[arm])
        elif isinstance(arm, type) and issubclass(arm, enum.Enum):
            words.append(f"one of {tuple(str(e.value) for e in arm)}")
        elif origin is Literal:
            words.append(f"one of {typing.get_args(arm)}")
        elif origin is list or arm is list:
            inner = typing.get_args(arm)
            words.append(f"a list of {describe(inner[0]).removeprefix('a ').removeprefix('an ')}s" if inner
                         else "a list")
        elif origin is dict or arm is dict:
            words.append("a mapping")
        else:
            words.append(getattr(arm, "__name__", str(arm)))
    return " or ".join(dict.fromkeys(words))


def _coerce_arm(value: Any, arm) -> Any:
    """``value`` as an ``arm`` value, or raise FieldTypeError."""
    origin = typing.get_origin(arm)
    if arm is type(None):
        if value is None:
            return None
    elif arm is bool:
        if isinstance(value, bool):
            return value
    elif arm is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif arm is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int is a valid float value (logging_steps: 10 stays 10)
    elif arm is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a run_name of 123 is the string "123"
    elif isinstance(arm, type) and issubclass(arm, enum.Enum):
        if isinstance(value, arm) or value in {e.value for e in arm}:
            return value
    elif origin is Literal:
        if value in typing.get_args(arm):
            return value
    elif origin is list or arm is list:
        inner = (typing.get_args(arm) or (Any,))[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(item, inner) for item in items]
    elif origin is dict or arm is dict:
        if isinstance(value, dict):
            return value
    else:  # a type we do not check here (Any, config objects): the config's own __post_init__ judges it
        return value
    raise FieldTypeError(describe(arm))


def coerce(value: Any, tp) -> Any:
    """``value`` converted to field type ``tp`` (an exact match first, then a lossless conversion), or
    FieldTypeError whose message says what the field expects."""
    arms = _arms(tp)
    for arm in sorted(arms, key=lambda a: a not in _SCALARS):  # bool before str, so `true` stays a bool
        if arm in _SCALARS and type(value) is arm:
            return value
    for arm in arms:
        try:
            return _coerce_arm(value, arm)
        except FieldTypeError:
            continue
    raise FieldTypeError(describe(tp))


def field_table(config_class) -> list[dict[str, Any]]:
    """Every init field of a config dataclass: name, type (in words), default and help."""
    hints = typing.get_type_hints(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        choices = f.metadata.get("choices")
        help_text = " ".join(str(f.metadata.get("help", "")).split())
        rows.append({"name": f.name, "type": describe(hints[f.name]), "default": default,
                     "choices": list(choices) if choices else None, "help": help_text})
    return rows


def check_fields(config_class, values: dict[str, Any], prefix: str = "trainer") -> dict[str, Any]:
    """``values`` with each converted to its field's type; the first misfit raises FieldTypeError naming
    ``prefix.field``, what it expects and what it got."""
    hints = typing.get_type_hints(config_class)
    by_name = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    out = {}
    for name, value in values.items():
        if name not in by_name:
            out[name] = value
            continue
        try:
            out[name] = coerce(value, hints[name])
        except FieldTypeError as exc:
            raise FieldTypeError(f"{prefix}.{name}: expected {exc}, got {value!r}") from None
        choices = by_name[name].metadata.get("choices")
        if choices and out[name] is not None and out[name] not in list(choices):
            raise FieldTypeError(f"{prefix}.{name}: expected one of {tuple(choices)}, got {value!r}")
    return out
