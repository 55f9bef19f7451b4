"""The trainer's offline default, built once in a cache: a pretrained micro-CLIP and a generated few-shot task."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from peft_clip_adapter.atomic import atomic_path, remove_abandoned
from peft_clip_adapter.manifest import apply_default_permissions
from peft_clip_adapter.testing.microclip import PretrainingConfig, build_micro_clip
from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS, SceneTask, write_task_dataset

#: The model's folder name: bump it when the pretraining changes, so that old caches are not reused.
MICRO_CLIP_FOLDER = "micro-clip-v1"
#: The pretraining settings of the offline micro-CLIP.
MICRO_CLIP_CONFIG = PretrainingConfig()
#: Generated images per class in the task's training and held-out folders.
IMAGES_PER_CLASS = {"train": 32, "validation": 50}


def offline_default_folders(cache_dir: str | os.PathLike, task_name: str) -> tuple[Path, Path, Path]:
    """The model, training-image and held-out-image folders of task ``task_name`` under ``cache_dir``."""
    root = Path(cache_dir) / "offline-default"
    return root / MICRO_CLIP_FOLDER, root / f"{task_name}-train", root / f"{task_name}-validation"


def build_offline_default(cache_dir: str | os.PathLike, task_name: str) -> tuple[Path, Path, Path]:
    """Build the missing folders of ``SCENE_TASKS[task_name]`` (the model: about a minute on 2 cores)."""
    return build_task_folders(cache_dir, SCENE_TASKS[task_name])


def build_task_folders(cache_dir: str | os.PathLike, task: SceneTask) -> tuple[Path, Path, Path]:
    """``build_offline_default`` for any ``SceneTask`` (e.g. ``scene_tasks.CLEAN_PAIRS``), named by its name."""
    model_dir, train_dir, validation_dir = offline_default_folders(cache_dir, task.name)
    build_once(model_dir, lambda path: build_micro_clip(path, MICRO_CLIP_CONFIG))
    for folder, split, seed in ((train_dir, "train", 0), (validation_dir, "validation", 1)):
        write = functools.partial(write_task_dataset, task=task, seed=seed)
        build_once(folder, functools.partial(write, images_per_class=IMAGES_PER_CLASS[split]))
    return model_dir, train_dir, validation_dir


def build_once(target: Path, build: Callable[[Path], object]) -> None:
    """Unless ``target`` exists, ``build(path)`` a temporary folder and rename it to ``target`` whole.

    Concurrent builds each rename a whole build into place; a killed one leaves a temporary the next removes.
    """
    if target.is_dir():
        return
    remove_abandoned(target)
    with atomic_path(target) as path:
        build(path)
        apply_default_permissions(path)  # the cache is shared like any other folder (safetensors writes 0600)
