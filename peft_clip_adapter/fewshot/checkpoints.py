"""Training checkpoints: Accelerate's ``save_state`` / ``load_state`` plus the loop's own state, checked on resume.

A checkpoint is a folder (``epoch_3``, ``step_400``) holding what ``accelerator.save_state`` writes and
``trainer_state.json``: the optimizer steps done, the history so far, the running loss of the current epoch and
the run settings. It is written beside its place and renamed into it whole (``peft_clip_adapter.atomic``), so a
run killed while saving leaves the previous checkpoints and no partial one. Resuming checks every file before
Accelerate reads it, and refuses a checkpoint of a run with other settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from peft_clip_adapter.atomic import atomic_path, remove_abandoned
from peft_clip_adapter.manifest import apply_default_permissions

TRAINER_STATE_FILE = "trainer_state.json"
#: The loop's state fields and their types, checked when a checkpoint is read.
_STATE_FIELDS = {
    "completed_steps": int,
    "train_loss_per_epoch": list,
    "eval_accuracy_per_epoch": dict,
    "epoch_loss_sum": (int, float),
    "epoch_steps": int,
}


def new_training_state(settings: dict[str, Any]) -> dict[str, Any]:
    """The loop's state before its first step, recording the run ``settings`` a resume must match."""
    return {
        "completed_steps": 0,
        "train_loss_per_epoch": [],
        "eval_accuracy_per_epoch": {},
        "epoch_loss_sum": 0.0,
        "epoch_steps": 0,
        "settings": settings,
    }


def find_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``output_dir``, oldest first; one with an unreadable state sorts last.

    Hidden folders (a save in progress or killed midway) are never listed.
    """
    found = [
        path.parent
        for path in Path(output_dir).glob(f"*/{TRAINER_STATE_FILE}")
        if not path.parent.name.startswith(".")
    ]
    return sorted(found, key=lambda folder: (_completed_steps(folder), (folder / TRAINER_STATE_FILE).stat().st_mtime))


def _completed_steps(folder: Path) -> float:
    try:
        return read_training_state(folder)["completed_steps"]
    except ValueError:
        return math.inf  # damaged: sorted last, so that `latest` reports it rather than silently skipping it


def read_training_state(folder: str | os.PathLike, hint: str = "") -> dict[str, Any]:
    """The loop's state saved in checkpoint ``folder``; a damaged file is a ``ValueError`` naming it."""
    path = Path(folder) / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error}): the checkpoint is damaged.{hint}") from error
    bad = [
        name
        for name, kind in _STATE_FIELDS.items()
        if not isinstance(state, dict) or not isinstance(state.get(name), kind)
    ]
    if bad or state["completed_steps"] < 0 or not isinstance(state.get("settings", {}), dict):
        raise ValueError(f"{path} is damaged: {bad or ['completed_steps']} missing or of the wrong type.{hint}")
    return state


def save_checkpoint(accelerator: Any, folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``accelerator.save_state`` and the loop's ``state`` as checkpoint ``folder``, all or nothing.

    Every process calls it: each writes its own random states into the main process's temporary folder.
    """
    from accelerate.utils import broadcast_object_list

    folder = Path(folder)
    if not accelerator.is_main_process:
        staging = broadcast_object_list([None])[0]
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        accelerator.wait_for_everyone()  # the main process has renamed it into place
        return
    remove_abandoned(folder)  # left by a run killed while saving
    with atomic_path(folder) as staging:
        staging.mkdir()
        broadcast_object_list([str(staging)])
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process's files are in
        (staging / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        apply_default_permissions(staging)  # safetensors writes 0600: a shared run folder needs the usual modes
    accelerator.wait_for_everyone()


def resolve_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """The checkpoint folder ``which`` names: a path, or ``"latest"`` in ``output_dir``."""
    if which == "latest":
        found = find_checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: {output_dir} holds no complete checkpoint.")
        return found[-1]
    folder = Path(which)
    if not (folder / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {folder} is not a complete checkpoint of this script.")
    return folder


def load_checkpoint(
    accelerator: Any,
    folder: str | os.PathLike,
    expected_settings: dict[str, Any],
    *,
    trust_unrecorded_settings: bool = False,
) -> dict[str, Any]:
    """Check checkpoint ``folder``, restore model, optimizer and RNG states from it, and return the loop's state.

    A damaged file is named, with the previous checkpoint beside it to resume from instead.

    Raises:
        ValueError: for a damaged or incomplete checkpoint, or one saved under other settings
            (``check_run_settings``).
    """
    folder = Path(folder)
    steps = _completed_steps(folder)  # infinite when damaged: then every readable one is earlier
    earlier = [
        path
        for path in find_checkpoints(folder.parent)
        if _completed_steps(path) < steps and path.resolve() != folder.resolve()
    ]
    hint = (
        f" Resume from the previous checkpoint instead: --resume_from_checkpoint {earlier[-1]}"
        if earlier
        else " No earlier checkpoint is readable: start afresh with --overwrite_output_dir."
    )
    state = read_training_state(folder, hint)
    check_run_settings(folder, state.get("settings"), expected_settings, trust_unrecorded=trust_unrecorded_settings)
    check_checkpoint_files(folder, accelerator.process_index, hint)
    accelerator.load_state(str(folder))
    state["settings"] = expected_settings  # recorded from now on, also for a trusted checkpoint that had none
    return state


def check_run_settings(
    folder: str | os.PathLike,
    saved: Optional[dict[str, Any]],
    expected: dict[str, Any],
    *,
    trust_unrecorded: bool = False,
) -> None:
    """Refuse to resume a checkpoint whose recorded settings differ from this run's (``--name old -> new``).

    A checkpoint that records no value for some setting (an older version's) resumes only when trusted.
    """
    unrecorded = [name for name in expected if name not in (saved or {})]
    if unrecorded and not trust_unrecorded:
        what = "no training settings" if saved is None else f"no value for {', '.join('--' + n for n in unrecorded)}"
        raise ValueError(
            f"--resume_from_checkpoint {folder} records {what} (saved by an older version of this script), so "
            "nothing shows it was trained with these flags. Resume with exactly that run's flags and pass "
            "--trust_checkpoint_settings, or start afresh."
        )
    changed = [
        f"--{name} {saved[name]!r} -> {value!r}"
        for name, value in expected.items()
        if name in (saved or {}) and saved[name] != value
    ]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {folder} was saved by a run with other settings ({'; '.join(changed)}). "
            "Resume with that run's flags, or start afresh in another --output_dir (or with --overwrite_output_dir)."
        )


def check_checkpoint_files(folder: str | os.PathLike, process_index: int = 0, hint: str = "") -> None:
    """Refuse a damaged checkpoint before Accelerate reads it.

    Accelerate would fail on a raw parser error, unpickle a pickled model file, or, for the random states,
    silently resume without them. The model must be safetensors; the optimizer and random states, which
    Accelerate pickles itself, must load with weights-only unpickling, which refuses objects that run code.
    """
    from accelerate.utils import load as weights_only_load
    from safetensors.torch import load_file

    from peft_clip_adapter.adapter_checks import refuse_pickles, verify_safetensors_file

    folder = Path(folder)
    model = folder / "model.safetensors"
    if not model.is_file():  # Accelerate pickles the optimizer and random states itself: those are checked below
        ignore = ["optimizer*.bin", "scheduler*.bin", "sampler*.bin", "random_states_*.pkl"]
        refuse_pickles(folder, model.name, what="checkpoint's model weights", ignore=ignore, hint=hint.strip())
    needed = [model, folder / "optimizer.bin", folder / f"random_states_{process_index}.pkl"]
    missing = [path.name for path in needed if not path.is_file()]
    if missing:
        raise ValueError(f"--resume_from_checkpoint {folder} lacks {missing}: the checkpoint is incomplete.{hint}")
    verify_safetensors_file(model, hint=hint.strip())
    tensors = load_file(model)
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{model} holds NaN or infinite values in {bad[:3]}: training had diverged.{hint}")
    for path in needed[1:]:
        try:
            weights_only_load(path, map_location="cpu")
        except Exception as error:  # zip, pickle and torch errors alike: all mean "do not resume from this"
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{path} cannot be loaded safely ({type(error).__name__}: {reason}): it is damaged, or holds objects "
                f"that weights-only loading refuses because loading them could run code.{hint}"
            ) from error


def prepare_output_dir(
    accelerator: Any, output_dir: str | os.PathLike, *, overwrite: bool, resuming: bool, also_remove: tuple = ()
) -> None:
    """Refuse an ``output_dir`` holding another run's files unless ``overwrite`` (or ``resuming``), then create it.

    Overwriting removes the previous run's checkpoints, killed saves' temporaries and ``also_remove`` (names
    in the folder, e.g. tracking logs), so that neither ``latest`` nor the logs can mix two runs.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output_dir {output_dir} is a file; pass a folder.")
    entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not (overwrite or resuming):
        # Resuming is only worth suggesting when there is a checkpoint to resume from.
        resume = ", --resume_from_checkpoint latest to continue that run" if find_checkpoints(output_dir) else ""
        raise ValueError(
            f"--output_dir {output_dir} already holds another run's files ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}). Pass --overwrite_output_dir to replace them{resume}, "
            "or choose another --output_dir."
        )
    accelerator.wait_for_everyone()  # every process has checked before anything is removed
    if accelerator.is_main_process:
        if entries and overwrite and not resuming:
            stale = [
                *find_checkpoints(output_dir),
                *output_dir.glob(".*.tmp-*"),
                *(output_dir / n for n in also_remove),
            ]
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
