"""Shared by the trainer's tests: the example script as a module, and a clean Accelerate state per run.

The test files load this module by path (pytest runs with ``--import-mode=importlib``, so ``tests/`` is
not on ``sys.path``) and re-export its fixtures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

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


@pytest.fixture
def online_hub(monkeypatch):
    """The Hub as the trainer sees it when online and logged in as ``me``, without any network.

    ``HfApi.whoami`` / ``create_repo`` / ``upload_folder`` are fakes (uploads are recorded with their files'
    bytes), and downloads find nothing (no card in the repository, no base model card).
    """
    import huggingface_hub
    from huggingface_hub import RepoUrl, constants
    from huggingface_hub.errors import EntryNotFoundError

    import peft_clip_adapter.peft_model

    record = SimpleNamespace(created=[], uploads=[])

    def create_repo(self, repo_id, **kwargs):
        record.created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        record.uploads.append(SimpleNamespace(repo_id=repo_id, files=files, kwargs=kwargs))

    def download(repo_id, filename, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no {filename} (test)")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *args, **kwargs: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(peft_clip_adapter.peft_model, "hf_hub_download", download)
    return record
