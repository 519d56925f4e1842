"""Typed field values: what each config field type accepts, the words of its error, the field listing."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Literal

import pytest

from llm_entreg.fields import FieldTypeError, check_fields, coerce, describe, field_table
from llm_entreg.recipes import config_class


class _Mode(enum.Enum):
    NO = "no"
    STEPS = "steps"


@dataclasses.dataclass
class _Config:
    rate: float = 1.0
    steps: int = 1
    flag: bool = False
    name: str = "x"
    mode: _Mode | str = "no"
    kind: Literal["a", "b"] = "a"
    maybe: float | None = None
    names: list[str] | None = None
    table: dict[str, Any] | str | None = None
    level: str = dataclasses.field(default="info", metadata={"choices": ["info", "debug"], "help": "how loud"})


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("rate", "abc", "trainer.rate: expected a float, got 'abc'"),
    ("rate", True, "trainer.rate: expected a float, got True"),
    ("steps", "abc", "trainer.steps: expected an integer, got 'abc'"),
    ("steps", 2.5, "trainer.steps: expected an integer, got 2.5"),
    ("flag", "maybe", "trainer.flag: expected true or false, got 'maybe'"),
    ("flag", 1, "trainer.flag: expected true or false, got 1"),
    ("mode", "sometimes", "trainer.mode: expected one of ('no', 'steps'), got 'sometimes'"),
    ("kind", "c", "trainer.kind: expected one of ('a', 'b'), got 'c'"),
    ("maybe", "x", "trainer.maybe: expected a float or null, got 'x'"),
    ("table", 3.5, None),  # a number is not a mapping, but the field also takes a string: "3.5"
    ("level", "loud", "trainer.level: expected one of ('info', 'debug'), got 'loud'"),
])
def test_a_misfit_names_the_field_what_it_expects_and_what_it_got(field, value, expected):
    if expected is None:
        assert check_fields(_Config, {field: value}) == {field: "3.5"}
        return
    with pytest.raises(FieldTypeError) as info:
        check_fields(_Config, {field: value})
    assert str(info.value) == expected


def test_fitting_values_pass_unchanged_or_converted_losslessly():
    given = {"rate": 3, "steps": 4.0, "flag": True, "name": 12, "mode": "steps", "kind": "b", "maybe": None,
             "names": "one", "table": {"a": 1}, "level": "debug"}
    out = check_fields(_Config, given)
    assert out == {"rate": 3, "steps": 4, "flag": True, "name": "12", "mode": "steps", "kind": "b", "maybe": None,
                   "names": ["one"], "table": {"a": 1}, "level": "debug"}
    assert type(out["steps"]) is int and type(out["rate"]) is int  # an int is a float value: kept as written


def test_describe_reads_like_the_type():
    assert describe(float | None) == "a float or null"
    assert describe(list[int]) == "a list of integers"
    assert describe(_Mode | str) == "one of ('no', 'steps')"
    assert coerce(None, int | None) is None


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "ppo"])
def test_every_trainer_field_is_listed_with_type_default_and_help(algorithm):
    rows = {row["name"]: row for row in field_table(config_class(algorithm))}
    assert rows["entropy_coef"]["type"] == "a float" and rows["entropy_coef"]["default"] == 0.0
    assert "β" in rows["entropy_coef"]["help"]
    assert rows["learning_rate"]["type"] == "a float"
    assert rows["lr_scheduler_type"]["type"].startswith("one of ('linear', 'cosine'")
    assert set(rows) == {f.name for f in dataclasses.fields(config_class(algorithm)) if f.init}
