"""Recipes are data: a YAML file names everything a run needs; this module loads, overrides and validates it.

Sections: ``algorithm`` (a name in :data:`llm_entreg.trainers.ALGORITHMS`), ``seed``, ``model``, ``data``,
``evaluation``, ``rewards``, ``trainer`` (fields of the algorithm's config), ``real_model`` (merged by ``--real``).
Overrides are ``key=value``; unknown keys are refused with the closest valid name. A recipe is a file path or the
name of a shipped recipe. Every key and default: docs/recipes.md.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

SECTIONS = {
    "algorithm": None,
    "seed": None,
    "description": None,
    "model": {"name_or_path": "embedded", "ref_name_or_path": None, "dtype": None},
    "data": {
        "train": "embedded",
        "train_split": "train",
        "eval": None,
        "eval_split": "validation",
        "max_train_samples": None,
        "max_eval_samples": None,
        "task": "add",
    },
    "evaluation": {"held_out": True, "num_prompts": 200, "split": "test", "max_new_tokens": 8, "num_samples": 16,
                   "curve_every": None, "curve_prompts": 64},
    # GRPO/PPO: reward functions by name (the embedded task's: correctness, format, partial_credit) or as
    # "package.module:function" import paths, with optional weights
    "rewards": {"funcs": ["correctness"], "weights": None, "reward_model": None},
    "trainer": None,  # validated against the algorithm's config dataclass
    "pseudo_label": None,  # sft only: the self-training loop's settings (llm_entreg.pseudo_label.PseudoLabelSpec)
    "real_model": None,  # merged by --real
}
#: The package that holds the shipped recipes (the repository's ``recipes/``).
RECIPE_PACKAGE = "llm_entreg.recipe_files"


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message names the key or the file."""


def _closest(key: str, choices) -> str:
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def algorithm_names() -> tuple[str, ...]:
    from .trainers import ALGORITHMS

    return tuple(ALGORITHMS)


def config_class(algorithm: str):
    """The config dataclass of a recipe algorithm (from :data:`llm_entreg.trainers.ALGORITHMS`)."""
    from .trainers import ALGORITHMS

    if algorithm not in ALGORITHMS:
        raise RecipeError(f"algorithm: unknown {algorithm!r}; choose from {tuple(ALGORITHMS)}")
    return ALGORITHMS[algorithm].config


def packaged_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name (``dpo_entropy`` -> its path)."""
    return {Path(item.name).stem: Path(str(item)) for item in files(RECIPE_PACKAGE).iterdir()
            if item.name.endswith(".yaml")}


def resolve_recipe_path(name: str | os.PathLike) -> Path:
    """A recipe file path, or the name of a shipped recipe (with or without ``.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped = packaged_recipes()
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise RecipeError(f"{name}: no such recipe file, and not the name of a shipped recipe ({sorted(shipped)})")


def trainer_fields(algorithm: str) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class(algorithm)) if f.init}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: ``no``/``yes``/``on``/``off`` stay strings (``save_strategy: no``), ``1e-4`` is a
    float. PyYAML's YAML 1.1 rules would read them as booleans and a string."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML with 1.2 scalars (``1e-4`` is a float; ``no``/``yes``/``on``/``off`` stay strings)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(text: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


def _section_keys(section: str) -> set[str]:
    if section == "pseudo_label":
        from .pseudo_label import PseudoLabelSpec

        return set(PseudoLabelSpec.keys())
    return set(SECTIONS[section])


def apply_override(recipe: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected key=value (e.g. entropy_coef=0.01)")
    key, text = item.split("=", 1)
    key = key.strip()
    value = _parse_value(text)
    algorithm = recipe.get("algorithm")
    fields = trainer_fields(algorithm)
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS or SECTIONS[section] is None and section not in ("trainer", "pseudo_label"):
            raise RecipeError(f"override {key!r}: unknown section {section!r}{_closest(section, SECTIONS)}")
        allowed = fields if section == "trainer" else _section_keys(section)
        if name not in allowed:
            raise RecipeError(f"override {key!r}: unknown key {name!r} in {section}{_closest(name, allowed)}")
        recipe.setdefault(section, {})[name] = value
    elif key in ("seed", "algorithm"):  # top-level first: ``seed`` seeds data, model and trainer alike
        recipe[key] = value
    elif key in fields:
        recipe.setdefault("trainer", {})[key] = value
    else:
        everything = set(fields) | {"seed", "algorithm"} | {
            f"{s}.{k}" for s, keys in SECTIONS.items() if isinstance(keys, dict) for k in keys
        }
        raise RecipeError(f"override {key!r}: unknown key{_closest(key, everything)}")


def validate(recipe: dict, source: str = "recipe") -> dict:
    """Fill defaults and refuse unknown keys, naming the key, the file and the closest valid name."""
    for key in recipe:
        if key not in SECTIONS:
            raise RecipeError(f"{source}: unknown top-level key {key!r}{_closest(key, SECTIONS)}")
    algorithm = recipe.get("algorithm")
    if algorithm not in algorithm_names():
        raise RecipeError(f"{source}: algorithm: expected one of {algorithm_names()}, got {algorithm!r}")
    out = {"algorithm": algorithm, "seed": int(recipe.get("seed", 0) or 0), "description": recipe.get("description")}
    for section, defaults in SECTIONS.items():
        if not isinstance(defaults, dict):
            continue
        given = recipe.get(section) or {}
        if not isinstance(given, dict):
            raise RecipeError(f"{source}: {section}: expected a mapping, got {type(given).__name__}")
        for key in given:
            if key not in defaults:
                raise RecipeError(f"{source}: {section}.{key}: unknown key{_closest(key, defaults)}")
        out[section] = {**defaults, **given}
    trainer = dict(recipe.get("trainer") or {})
    fields = trainer_fields(algorithm)
    for key in trainer:
        if key not in fields:
            raise RecipeError(f"{source}: trainer.{key}: unknown key{_closest(key, fields)}")
    out["trainer"] = _typed_trainer(algorithm, trainer, source)
    if recipe.get("pseudo_label") is not None:
        out["pseudo_label"] = _pseudo_label_section(recipe["pseudo_label"], algorithm, source)
    if recipe.get("real_model") is not None:
        out["real_model"] = recipe["real_model"]
    return out


def _pseudo_label_section(given, algorithm: str, source: str) -> dict:
    from .pseudo_label import PseudoLabelSpec

    if algorithm != "sft":
        raise RecipeError(f"{source}: pseudo_label: the self-training loop trains with algorithm 'sft', not "
                          f"{algorithm!r}")
    if not isinstance(given, dict):
        raise RecipeError(f"{source}: pseudo_label: expected a mapping, got {type(given).__name__}")
    keys = PseudoLabelSpec.keys()
    for key in given:
        if key not in keys:
            raise RecipeError(f"{source}: pseudo_label.{key}: unknown key{_closest(key, keys)}")
    try:
        PseudoLabelSpec(**given)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return dict(given)


def _typed_trainer(algorithm: str, trainer: dict, source: str) -> dict:
    """The trainer section with every value converted to its field's type (``resume_from_checkpoint`` also takes
    ``true``: the newest checkpoint in ``output_dir``, as in TRL's scripts)."""
    from .fields import FieldTypeError, check_fields

    resume = trainer.get("resume_from_checkpoint")
    if isinstance(resume, bool) or str(resume).lower() in ("true", "false", "latest", "last"):
        trainer["resume_from_checkpoint"] = str(resume).lower() in ("true", "latest", "last") or None
    elif resume is not None and not isinstance(resume, str):
        raise RecipeError(f"{source}: trainer.resume_from_checkpoint: expected a checkpoint directory or true, "
                          f"got {resume!r}")
    typed = {k: v for k, v in trainer.items() if k != "resume_from_checkpoint"}
    try:
        typed = check_fields(config_class(algorithm), typed)
    except FieldTypeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    if "resume_from_checkpoint" in trainer:
        typed["resume_from_checkpoint"] = trainer["resume_from_checkpoint"]
    deepspeed = typed.get("deepspeed")
    if isinstance(deepspeed, str) and not os.path.isfile(os.path.expanduser(deepspeed)):
        raise RecipeError(f"{source}: trainer.deepspeed: {deepspeed!r} is not a file (a DeepSpeed JSON config)")
    return typed


def trainer_arguments(recipe: dict) -> dict:
    """The keyword arguments of the recipe's trainer config (the recipe's seed unless the trainer sets one; no
    logger unless ``report_to`` names one)."""
    args = {k: v for k, v in recipe["trainer"].items() if k != "resume_from_checkpoint"}
    args.setdefault("seed", recipe["seed"])
    args.setdefault("report_to", [])
    return args


#: Settings that depend on the machine, not the recipe: left out of the early check (a ``--real`` recipe loads on a
#: CPU-only machine, e.g. to dispatch a sweep to GPU workers); the run checks them when it builds its trainer.
MACHINE_SETTINGS = {"use_cpu": True, "bf16": False, "fp16": False, "tf32": None, "deepspeed": None}


def check_trainer_config(recipe: dict, source: str) -> None:
    """Build the recipe's trainer config once, so that every value the config itself checks (a negative
    entropy_coef, an unknown loss type, ...) fails here, before any model loads."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real construction, later, shows them once
        try:
            config_class(recipe["algorithm"])(**{**trainer_arguments(recipe), **MACHINE_SETTINGS})
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{source}: trainer: {exc}") from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), real: bool = False) -> dict:
    """Load a YAML recipe (a path or a shipped recipe's name), merge ``real_model`` if ``real``, apply ``overrides``,
    validate, and return a dict."""
    path = resolve_recipe_path(path)
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    if real:
        extra = raw.get("real_model")
        if not extra:
            raise RecipeError(f"{path}: --real given but the recipe has no real_model section")
        raw = _merge({k: v for k, v in raw.items() if k != "real_model"}, extra)
    raw.setdefault("algorithm", None)
    if raw["algorithm"] not in algorithm_names():
        raise RecipeError(f"{path}: algorithm: expected one of {algorithm_names()}, got {raw['algorithm']!r}")
    for item in overrides:
        apply_override(raw, item)
    recipe = validate(raw, str(path))
    recipe["trainer"].setdefault("output_dir", os.path.join("runs", path.stem))
    recipe["source"] = str(path)
    check_trainer_config(recipe, str(path))
    return recipe
