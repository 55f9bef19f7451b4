"""A trainer run killed mid-training (SIGKILL) and resumed gives the same adapter as an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

pytestmark = pytest.mark.slow


def _args(tiny_clip_path: str, shapes_dir: str, run: Path) -> list[str]:
    # 32 images in batches of 4: 8 steps per epoch, 2400 in all; checkpoints every 50 steps land mid-epoch.
    return helpers.trainer_args(
        tiny_clip_path, shapes_dir, run, shots=8, views=3, num_train_epochs=300, per_device_train_batch_size=4,
        learning_rate=0.05, eval_every_epochs=50,
    )  # fmt: skip


def _wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, timeout: float = 300.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(output_dir.glob("step_*/trainer_state.json"))
        if found:
            return found[0].parent
        if process.poll() is not None:
            raise AssertionError(f"The run ended (code {process.returncode}) before writing a checkpoint.")
        time.sleep(0.02)
    raise AssertionError("No checkpoint appeared in time.")


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_clip_path, shapes_dir, tmp_path):
    reference = helpers.run_fewshot(_args(tiny_clip_path, shapes_dir, tmp_path / "reference")).results

    output_dir = tmp_path / "interrupted" / "out"
    argv = [*_args(tiny_clip_path, shapes_dir, tmp_path / "interrupted"), "--checkpointing_steps", "50"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(helpers.EXAMPLE), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_checkpoint(process, output_dir)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (output_dir / "adapter_model.safetensors").exists()  # really killed mid-training
    steps = [json.loads(path.read_text())["completed_steps"] for path in output_dir.glob("step_*/trainer_state.json")]
    assert 0 < max(steps) < 2400

    resumed = helpers.run_fewshot([*argv, "--resume_from_checkpoint", "latest"]).results
    expected, actual = helpers.adapter_tensors(tmp_path / "reference" / "out"), helpers.adapter_tensors(output_dir)
    assert sorted(expected) == sorted(actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-7)
    assert resumed["train_loss_per_epoch"] == pytest.approx(reference["train_loss_per_epoch"], rel=1e-5)
    assert resumed["eval_accuracy_per_epoch"] == reference["eval_accuracy_per_epoch"]
    assert resumed["eval_accuracy"] == reference["eval_accuracy"]


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    from peft_clip_adapter.fewshot.checkpoints import resolve_checkpoint

    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint latest: .*out holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "out", "latest")
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*nowhere is not a complete checkpoint"):
        resolve_checkpoint(tmp_path / "out", str(tmp_path / "nowhere"))


def test_resume_under_other_settings_is_refused(tiny_clip_path, shapes_dir, tmp_path):
    from peft_clip_adapter.fewshot.checkpoints import check_run_settings

    argv = helpers.trainer_args(
        tiny_clip_path, shapes_dir, tmp_path, shots=4, views=1, num_train_epochs=2, checkpointing_steps="epoch"
    )
    helpers.run_fewshot(argv)
    resume = [*argv, "--resume_from_checkpoint", "latest"]
    # Another branch would not even load (other state-dict keys); other shots would silently train another run.
    match = r"epoch_2 was saved by a run with other settings \(--adapt 'vision' -> 'both'\)"
    helpers.fewshot_error([*resume, "--adapt", "both"], match)
    state = json.loads((tmp_path / "out" / "epoch_2" / "trainer_state.json").read_text())
    other = {**state["settings"], "shots": 8, "end_to_end": True}
    with pytest.raises(ValueError, match=r"other settings \(--shots 4 -> 8; --end_to_end False -> True\)"):
        check_run_settings(tmp_path / "out" / "epoch_2", state["settings"], other)
    resumed = helpers.run_fewshot(resume).results
    assert resumed["train_loss_per_epoch"] == pytest.approx(state["train_loss_per_epoch"])
