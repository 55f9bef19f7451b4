"""The codebase's shape: modules per layer, lines, docstring share, the trainer script's length, import time.

    python benchmarks/code_shape.py                       # this checkout
    python benchmarks/code_shape.py --root ../other-clone # another checkout, e.g. before a change

Import time is the median of fresh interpreters, beside the same figure for ``import peft`` measured in the
same run (the floor: the package cannot import faster than peft, which it registers with).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"fewshot": "toolkit", "testing": "testbed"}


def docstring_lines(source: str) -> int:
    """Lines taken by the docstrings of the module, its classes and its functions."""
    total = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                total += first.end_lineno - first.lineno + 1
    return total


def package_shape(package: Path) -> dict:
    """Modules (``__init__`` aside) and lines per layer, and the docstring share of all lines."""
    layers: dict[str, dict[str, int]] = {}
    lines = docs = 0
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).parts
        layer = LAYERS.get(relative[0], "method") if len(relative) > 1 else "method"
        source = path.read_text(encoding="utf-8")
        count = len(source.splitlines())
        entry = layers.setdefault(layer, {"modules": 0, "lines": 0})
        entry["modules"] += path.name != "__init__.py"
        entry["lines"] += count
        lines += count
        docs += docstring_lines(source)
    return {"layers": layers, "lines": lines, "docstring_lines": docs, "docstring_share": round(docs / lines, 3)}


def run_python(code: str, root: Path, environment: dict[str, str]) -> str:
    """The output of ``python -c code`` run in ``root`` (so that ``root``'s package is the one imported)."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment, cwd=root
    ).stdout


def import_seconds(statement: str, root: Path, repeats: int) -> float:
    """Median wall time of ``statement`` in a fresh interpreter that imports from ``root``."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    environment = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment
            ).stdout
        )
        for _ in range(repeats)
    ]
    return round(statistics.median(times), 3)


def measure(root: Path, repeats: int) -> dict:
    script = root / "examples" / "fewshot.py"
    shape = package_shape(root / "peft_clip_adapter")
    shape["script_lines"] = len(script.read_text(encoding="utf-8").splitlines())
    shape["import_seconds"] = {
        "peft (floor)": import_seconds("import peft", root, repeats),
        "peft_clip_adapter": import_seconds("import peft_clip_adapter", root, repeats),
    }
    shape["import_ratio"] = round(
        shape["import_seconds"]["peft_clip_adapter"] / shape["import_seconds"]["peft (floor)"], 2
    )
    probe = "import sys, peft_clip_adapter; print('datasets' in sys.modules)"
    shape["imports_datasets"] = run_python(probe, root, {**os.environ, "PYTHONPATH": str(root)}).strip() == "True"
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per import timing")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(json.dumps(measure(args.root.resolve(), args.repeats), indent=2))


if __name__ == "__main__":
    main()
