"""The package's imports flow one way: toolkit -> method, never back, and no module imports itself in a circle.

Read from the source (every ``import`` statement, including those inside functions), so a lazy import
that only hides a cycle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import peft_clip_adapter

PACKAGE = Path(peft_clip_adapter.__file__).resolve().parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
#: The PEFT method: what peft needs to build, save and load an adapter. The rest is the few-shot toolkit.
METHOD_MODULES = {
    "config", "layer", "families", "model", "registration", "peft_model", "card", "checkpoint", "manifest",
}  # fmt: skip


def imported_modules(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (``__init__`` for the package root)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "peft_clip_adapter" else [
                f"peft_clip_adapter.{alias.name}" for alias in node.names
            ]  # fmt: skip
        else:
            continue
        for name in names:
            if name == "peft_clip_adapter" or name.startswith("peft_clip_adapter."):
                target = name.removeprefix("peft_clip_adapter").lstrip(".").split(".")[0]
                found.add(target if target in MODULES else "__init__")
    return found - {module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_the_method_imports_no_toolkit_module():
    assert set(MODULES) >= METHOD_MODULES
    leaks = {module: sorted(GRAPH[module] - METHOD_MODULES) for module in METHOD_MODULES}
    assert {module: names for module, names in leaks.items() if names} == {}


def test_registration_depends_on_the_method_modules_not_the_other_way_round():
    assert {"config", "layer", "model"} <= GRAPH["registration"]
    assert sorted(module for module in METHOD_MODULES if "registration" in GRAPH[module]) == []


def test_the_package_has_no_import_cycle():
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(GRAPH[module]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in MODULES:
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_the_graph_is_read_from_the_source():
    # A check of the checker: known edges are found, including a function-level import.
    assert "families" in GRAPH["model"] and "peft_model" in GRAPH["model"]  # the latter inside a method
    assert "checkpoint" in GRAPH["config"]  # inside from_pretrained
    assert GRAPH["__init__"] >= {"config", "model", "registration", "classifier"}
