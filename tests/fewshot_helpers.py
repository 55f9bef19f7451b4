"""Shared by the trainer's tests: running ``examples/fewshot.py`` as users do, and a clean Accelerate state.

The test files load this module by path (pytest runs with ``--import-mode=importlib``, so ``tests/`` is
not on ``sys.path``) and re-export its fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fewshot.py"
# Runs the script as `python examples/fewshot.py` does, after a prelude (test doubles set up in the child).
_RUN_AFTER_PRELUDE = (
    "import runpy, sys\nexec(sys.argv.pop(1))\nsys.argv.pop(0)\nrunpy.run_path(sys.argv[0], run_name='__main__')"
)


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file ``path`` as module ``name`` (test helpers only: the trainer is run, never imported)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter weights a run saved in ``output_dir``."""
    return load_file(Path(output_dir) / "adapter_model.safetensors")


def run_fewshot(
    argv: list[str], *, prelude: str = "", env: Optional[dict] = None, expect_code: int = 0
) -> SimpleNamespace:
    """Run the trainer in a fresh interpreter; returns ``.results`` (its all_results.json), ``.log`` and ``.code``.

    ``prelude`` is Python run in the child before the script (to install test doubles). A run ending with
    another exit code than ``expect_code`` fails the test with the end of its log.
    """
    command = [sys.executable, str(EXAMPLE), *argv]
    if prelude:
        command = [sys.executable, "-c", _RUN_AFTER_PRELUDE, prelude, str(EXAMPLE), *argv]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    log = finished.stdout + finished.stderr
    assert finished.returncode == expect_code, f"exit code {finished.returncode}:\n{log[-4000:]}"
    results = None
    if "--output_dir" in argv and finished.returncode == 0:
        results = json.loads((Path(argv[argv.index("--output_dir") + 1]) / "all_results.json").read_text())
    return SimpleNamespace(results=results, log=log, code=finished.returncode)


def run_fewshot_pairwise(runs: list[list[str]]) -> list[SimpleNamespace]:
    """``run_fewshot`` on each argv, two at a time: each run is mostly one thread, and CI has two cores."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run_fewshot, runs))


def fewshot_error(argv: list[str], match: str, **options) -> str:
    """Run the trainer expecting a user error: exit code 2 and one ``error:`` line matching ``match``."""
    run = run_fewshot(argv, expect_code=2, **options)
    errors = [line for line in run.log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(match, errors[0]), run.log[-4000:]
    assert "Traceback" not in run.log, run.log[-4000:]
    return errors[0]


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that the next in-process Accelerator builds its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process Accelerator starts afresh; Accelerate keeps process-wide singletons."""
    yield
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


def fake_hub_prelude(record: Path) -> str:
    """A ``run_fewshot`` prelude: the Hub of ``online_hub`` in the child, recording into the folder ``record``.

    Created repositories are appended to ``record/created.txt``; each upload's folder is copied to
    ``record/uploads/<repo id with / as -->``.
    """
    return f"""
import pathlib, shutil
import huggingface_hub
from huggingface_hub import RepoUrl, constants
from huggingface_hub.errors import EntryNotFoundError
import peft_clip_adapter.peft_model

record = pathlib.Path({str(record)!r})
record.mkdir(parents=True, exist_ok=True)

def create_repo(self, repo_id, **kwargs):
    with open(record / "created.txt", "a") as file:
        file.write(repo_id + "\\n")
    return RepoUrl(f"https://huggingface.co/{{repo_id if '/' in repo_id else 'me/' + repo_id}}")

def upload_folder(self, *, repo_id, folder_path, **kwargs):
    shutil.copytree(folder_path, record / "uploads" / repo_id.replace("/", "--"))

def download(repo_id, filename, **kwargs):
    raise EntryNotFoundError(f"{{repo_id}} has no {{filename}} (test)")

constants.HF_HUB_OFFLINE = False
huggingface_hub.HfApi.whoami = lambda self, *args, **kwargs: {{"name": "me"}}
huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
huggingface_hub.hf_hub_download = download
peft_clip_adapter.peft_model.hf_hub_download = download
"""
