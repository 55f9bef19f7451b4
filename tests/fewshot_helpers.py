"""Shared by the trainer's tests: the example script as a module, and a clean Accelerate state per run.

The test files load this module by path (pytest runs with ``--import-mode=importlib``, so ``tests/`` is
not on ``sys.path``) and re-export its fixtures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fewshot.py"


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter weights a run saved in ``output_dir``."""
    return load_file(Path(output_dir) / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def fewshot() -> ModuleType:
    """``examples/fewshot.py`` (not part of the package), for in-process ``main(argv)`` runs."""
    return load_module(EXAMPLE, "fewshot_example")


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that the next in-process run builds its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; Accelerate keeps process-wide singletons."""
    yield
    reset_accelerate_state()


def run_trainer(module: ModuleType, argv: list[str]) -> dict:
    """``module.main(argv)`` with a clean Accelerate state afterwards (for runs inside one fixture)."""
    try:
        return module.main(argv)
    finally:
        reset_accelerate_state()


def trainer_args(model: str, train_dir: str, run_dir: Path, **flags: object) -> list[str]:
    """Command-line arguments for a run on ``model`` and ``train_dir`` writing under ``run_dir``.

    ``flags`` become ``--name value`` pairs; the output and cache folders are ``run_dir/out`` and
    ``run_dir/cache``.
    """
    argv = ["--model_name_or_path", model, "--train_dir", train_dir]
    argv += ["--output_dir", str(Path(run_dir) / "out"), "--cache_dir", str(Path(run_dir) / "cache")]
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    return argv
