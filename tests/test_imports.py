"""The package's import graph (static, from the source): arrows point down only. ``ops`` imports nothing of ours
outside ``ops`` and no TRL or transformers; no module imports another module's private (``_name``) objects; and no
two modules import each other, directly or through a chain (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm_entreg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(module imported, names taken from it)`` for every import statement in ``path``, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            if node.module is None:  # "from . import x": x is a module of the package
                for n in names:
                    yield f"{target}.{n}", []
            else:
                yield target, names


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _ours(target: str) -> str | None:
    """The module of ours that ``target`` names (a package or a module), or None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_ops_imports_nothing_outside_ops():
    for name, path in MODULES.items():
        if not name.startswith("llm_entreg.ops"):
            continue
        for target, _ in _imports(path):
            top = target.split(".")[0]
            assert top not in ("trl", "transformers", "peft", "accelerate", "datasets"), f"{name} imports {target}"
            if top == "llm_entreg":
                assert target.startswith("llm_entreg.ops"), f"{name} imports {target}"


def test_no_private_names_imported_across_modules():
    for name, path in MODULES.items():
        for target, names in _imports(path):
            if _ours(target) in (None, name):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{name} imports private {private} from {target}"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target, names in _imports(path):
            mod = _ours(target)
            if mod is None:
                continue
            # "from package import name": a submodule when it is one, else the package's __init__
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            deps.update(subs or [mod])
        deps.discard(name)
        graph[name] = deps
    return graph


def test_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            # a package's __init__ re-exporting its own submodules is not a cycle
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
