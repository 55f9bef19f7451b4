"""Few-shot classification tasks drawn from the scene generator, written as image folders.

Classes are named by words the micro-CLIP learned, so zero-shot is meaningful, and each task leaves room
for an adapter:

- ``held-out-pairs``: 12 colour-shape pairs, the 6 pretraining never showed (``microclip.HELD_OUT_PAIRS``)
  and 6 seen ones with swapped colours, so both words must be read.
- ``dusk-pairs``: 9 pairs under the ``dusk`` shift (dim, blurred, noisy) pretraining never saw: zero-shot
  drops, and shots under the same shift show the adapter the way back. The trainer's offline default.

``write_task_dataset("dusk-train", SCENE_TASKS["dusk-pairs"], images_per_class=16, seed=0)`` writes a
folder ``datasets.load_dataset("imagefolder", data_dir=...)`` reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from peft_clip_adapter.testing.microclip import HELD_OUT_PAIRS
from peft_clip_adapter.testing.scenes import COLOURS, SHAPES, apply_shift, render_scenes, sample_scenes


@dataclass(frozen=True)
class SceneTask:
    """A few-shot task over generated scenes: its classes, the attributes each class fixes, and the image shift.

    ``constraints[i]`` is class ``i``'s fixed attributes, e.g. ``{"shape": "circle", "colour": "red"}``; the rest
    are drawn at random. Raises ``ValueError`` for an unknown attribute or value, or a count of constraints that
    differs from the classes'.
    """

    name: str
    classes: tuple[str, ...]
    constraints: tuple[dict[str, str], ...]
    shift: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.constraints):
            raise ValueError(
                f"Task {self.name!r} has {len(self.classes)} classes but {len(self.constraints)} constraints."
            )
        allowed = {"shape": SHAPES, "colour": tuple(COLOURS)}
        for constraint in self.constraints:
            for attribute, value in constraint.items():
                if value not in allowed.get(attribute, ()):
                    raise ValueError(
                        f"Task {self.name!r}: constraint {attribute}={value!r} must fix 'shape' (one of {SHAPES}) "
                        f"or 'colour' (one of {tuple(COLOURS)})."
                    )


#: Seen pairs that give each held-out pair's shape and colour a second partner (a colour swap among them).
_SEEN_PARTNERS: tuple[tuple[str, str], ...] = (
    ("circle", "yellow"),
    ("square", "red"),
    ("triangle", "blue"),
    ("cross", "orange"),
    ("diamond", "green"),
    ("ring", "purple"),
)


def _pairs_task(name: str, pairs: list[tuple[str, str]], shift: str, description: str) -> SceneTask:
    return SceneTask(
        name=name,
        classes=tuple(f"{colour} {shape}" for shape, colour in pairs),
        constraints=tuple({"shape": shape, "colour": colour} for shape, colour in pairs),
        shift=shift,
        description=description,
    )


#: The tasks by name.
SCENE_TASKS: dict[str, SceneTask] = {
    "held-out-pairs": _pairs_task(
        "held-out-pairs",
        [*HELD_OUT_PAIRS, *_SEEN_PARTNERS],
        "none",
        "12 colour-shape pairs, 6 of them never seen together in pretraining",
    ),
    "dusk-pairs": _pairs_task(
        "dusk-pairs",
        list(itertools.product(("circle", "square", "triangle"), ("red", "blue", "yellow"))),
        "dusk",
        "9 colour-shape pairs (3 never seen together) in dim, blurred, noisy images: an unseen shift",
    ),
}

#: The dusk task's classes in clean images: the source domain of the offline cross-domain protocol.
CLEAN_PAIRS = dataclasses.replace(
    SCENE_TASKS["dusk-pairs"], name="clean-pairs", shift="none", description="the dusk task's 9 pairs, unshifted"
)


def render_task_images(
    task: SceneTask, images_per_class: int, generator: torch.Generator, *, image_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images_per_class`` images of every class, shifted: ``([C * n, 3, H, W] uint8, [C * n] int64 labels)``."""
    chunks = []
    for constraint in task.constraints:
        scenes = sample_scenes(images_per_class, generator)
        fixed = {
            "shape": torch.full((images_per_class,), SHAPES.index(constraint["shape"]))
            if "shape" in constraint
            else scenes.shape,
            "colour": torch.full((images_per_class,), list(COLOURS).index(constraint["colour"]))
            if "colour" in constraint
            else scenes.colour,
        }
        scenes = type(scenes)(fixed["shape"], fixed["colour"], scenes.size, scenes.texture, scenes.position)
        chunks.append(apply_shift(render_scenes(scenes, generator, image_size=image_size), task.shift, generator))
    labels = torch.arange(len(task.classes)).repeat_interleave(images_per_class)
    return torch.cat(chunks), labels


def write_task_dataset(
    root: str | os.PathLike, task: SceneTask, *, images_per_class: int, seed: int = 0, image_size: int = 32
) -> str:
    """Write the task as an image folder ``root/<class name>/<n>.png``; returns ``str(root)``.

    Use different seeds for training and held-out folders. Raises ``ValueError`` for ``images_per_class < 1``.
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}.")
    images, labels = render_task_images(
        task, images_per_class, torch.Generator().manual_seed(seed), image_size=image_size
    )
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = Path(root) / task.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")
    return str(root)
