"""Imports flow one way between the package's layers: testbed -> toolkit -> method, and never in a circle.

The layers are the folders: ``peft_clip_adapter/`` itself holds the method, ``fewshot/`` the toolkit and
``testing/`` the testbed. The graph is read from the source (every ``import`` statement, including those
inside functions), so a lazy import that only hides a cycle or a back edge counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import peft_clip_adapter

PACKAGE = Path(peft_clip_adapter.__file__).resolve().parent
# Lower layers first: a module may import its own layer and the layers before it.
LAYERS = ("method", "fewshot", "testing")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "method"


def imported_modules(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source."""
    found = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found - {module}


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_every_module_belongs_to_a_layer_folder():
    assert {layer_of(module) for module in MODULES} == set(LAYERS)
    # Few enough modules side by side in any one folder that a reader sees what each is for.
    per_folder: dict[Path, int] = {}
    for path in MODULES.values():
        per_folder[path.parent] = per_folder.get(path.parent, 0) + (path.name != "__init__.py")
    assert max(per_folder.values()) <= 12, per_folder


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_to_the_same_or_a_lower_layer(module):
    # The package root re-exports toolkit names, lazily, through importlib: not an import statement.
    upward = {target for target in GRAPH[module] if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))}
    assert upward == set()


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
    # A check of the checker: known edges are found, including relative and function-level imports.
    assert "peft_clip_adapter.families" in GRAPH["peft_clip_adapter.model"]
    assert "peft_clip_adapter.fewshot.inputs.images" in GRAPH["peft_clip_adapter.fewshot.data"]
    assert "peft_clip_adapter.testing.tiny_models" in GRAPH["peft_clip_adapter.testing.microclip"]
    assert layer_of("peft_clip_adapter.fewshot.inputs.loader") == "fewshot"


def test_importing_the_package_loads_neither_datasets_nor_the_toolkit():
    script = (
        "import sys, peft_clip_adapter\n"
        "print(sorted(m for m in sys.modules if m == 'datasets' or m.startswith('peft_clip_adapter.fewshot')))\n"
        "from peft_clip_adapter import FewShotClassifier\n"
        "print(FewShotClassifier.__module__)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.splitlines() == ["[]", "peft_clip_adapter.fewshot.shareable_classifier"]
