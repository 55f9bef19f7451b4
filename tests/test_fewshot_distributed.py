"""Two CPU processes (gloo, via ``accelerate launch``) train the same adapter as one process at the same global batch.

``accelerate launch --cpu --num_processes 2`` would silently run ONE process, so the launch uses
``--multi_gpu`` and the script's own ``--cpu`` flag (see DESIGN.md, section 2).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _args(tiny_clip_path: str, shapes_dir: str, run: Path, per_device_batch: int) -> list[str]:
    # 8 shots x 4 classes = 32 training images: two global batches of 16 per epoch, nothing dropped.
    # 8 held-out images in eval batches of 3 leave the processes uneven shares to gather. Each run has
    # its own feature cache, so the 2-process run really extracts (rows split, then gathered). The ratio is
    # searched on the main process and broadcast: both runs must choose the same.
    argv = helpers.trainer_args(
        tiny_clip_path, shapes_dir, run, shots=8, views=2, num_train_epochs=6, learning_rate=0.05,
        per_device_train_batch_size=per_device_batch, per_device_eval_batch_size=3,
    )  # fmt: skip
    return [*argv, "--ratio", "auto", "--ratio_grid", "0.2", "0.6"]


def test_two_processes_match_one_process(tiny_clip_path, shapes_dir, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(helpers.EXAMPLE), "--cpu", *_args(tiny_clip_path, shapes_dir, tmp_path / "two", per_device_batch=8),
        "--checkpointing_steps", "epoch",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "out" / "all_results.json").read_text())

    one = helpers.run_fewshot(_args(tiny_clip_path, shapes_dir, tmp_path / "one", per_device_batch=16)).results

    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert two["num_eval_images"] == one["num_eval_images"] == 8  # none duplicated, none dropped
    assert two["num_train_images"] == one["num_train_images"] == 32
    assert two["zero_shot_accuracy"] == one["zero_shot_accuracy"]
    # The search ran on one process of each launch, on features equal to float tolerance: the same choice.
    searched = [run["hyperparameter_search"] for run in (one, two)]
    assert two["ratio"] == one["ratio"] == searched[0]["ratio"] == searched[1]["ratio"]
    for alone, shared in zip(*(search["candidates"] for search in searched), strict=True):
        assert alone["validation_accuracy"] == shared["validation_accuracy"]
        assert alone["validation_loss"] == pytest.approx(shared["validation_loss"], rel=1e-5)
    assert two["eval_accuracy"] == one["eval_accuracy"]
    assert two["per_class_accuracy"] == one["per_class_accuracy"]
    assert two["train_loss_per_epoch"] == pytest.approx(one["train_loss_per_epoch"], rel=1e-5)
    expected, actual = (
        helpers.adapter_tensors(tmp_path / "one" / "out"),
        helpers.adapter_tensors(tmp_path / "two" / "out"),
    )
    assert sorted(expected) == sorted(actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    # Each process wrote its random states into the checkpoint the main process renamed into place.
    checkpoint = tmp_path / "two" / "out" / "epoch_6"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not list((tmp_path / "two" / "out").glob(".*"))  # no temporary left
    # The adapter really trained (so equal adapters are not just equal initialisations).
    assert len(one["train_loss_per_epoch"]) == 6 and one["train_loss_per_epoch"][-1] < one["train_loss_per_epoch"][0]
