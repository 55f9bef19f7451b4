"""Few-shot classification tasks drawn from the scene generator, written as image folders.

Each task names its classes by the words the micro-CLIP learned (``peft_clip_adapter.testing.microclip``), so its
zero-shot classifier is meaningful, and each leaves room for an adapter:

- ``held-out-pairs``: 12 colour-shape pairs: the 6 combinations pretraining never showed
  (``microclip.HELD_OUT_PAIRS``) and 6 seen ones that swap their colours, so every shape comes in two
  colours and every colour on two shapes, and both words must be read. Zero-shot composes the unseen
  pairs from their words, less well than the seen ones.
- ``dusk-pairs``: 9 pairs (red, blue or yellow x circle, square or triangle; three of them held out)
  under the ``dusk`` shift (dim, blurred, noisy), never seen in pretraining: zero-shot drops, and the
  few shots, taken under the same shift, show the adapter the way back. The trainer's offline default.

The folders load with ``datasets.load_dataset("imagefolder", data_dir=root)``::

    write_task_dataset("dusk-train", SCENE_TASKS["dusk-pairs"], images_per_class=16, seed=0)
"""

from __future__ import annotations

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
    """A few-shot task over generated scenes: its classes, what each class fixes, and the image shift.

    Args:
        name: The task's key in ``SCENE_TASKS``.
        classes: Class names, used as folder names and in the prompts.
        constraints: Per class, the attributes it fixes: ``{"shape": "circle", "colour": "red"}``; the other
            attributes are drawn at random.
        shift: An image shift of ``peft_clip_adapter.testing.scenes.SHIFTS``.
        description: One line about the task.

    Raises:
        ValueError: for a constraint on an unknown attribute or value, or as many classes as constraints.

    Example:
        >>> task = SCENE_TASKS["dusk-pairs"]
        >>> len(task.classes), task.classes[0], task.constraints[0], task.shift
        (9, 'red circle', {'shape': 'circle', 'colour': 'red'}, 'dusk')
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


def render_task_images(
    task: SceneTask, images_per_class: int, generator: torch.Generator, *, image_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``images_per_class`` images of every class of ``task``, shift included.

    Args:
        task: The task.
        images_per_class: Images per class.
        generator: The random source of the free attributes, the rendering and the shift.
        image_size: Side of the square images.

    Returns:
        ``([C * n, 3, H, W] uint8 images, [C * n] int64 labels)``, class by class.

    Example:
        >>> images, labels = render_task_images(SCENE_TASKS["dusk-pairs"], 2, torch.Generator().manual_seed(0))
        >>> images.shape, labels.tolist()[:6]
        (torch.Size([18, 3, 32, 32]), [0, 0, 1, 1, 2, 2])
    """
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
    """Write ``task``'s images as an image folder: ``root/<class name>/<n>.png``.

    Args:
        root: Folder to write.
        task: The task (e.g. ``SCENE_TASKS["dusk-pairs"]``).
        images_per_class: Images per class.
        seed: Seed of the images (use different seeds for training and held-out folders).
        image_size: Side of the square images.

    Returns:
        ``str(root)``.

    Raises:
        ValueError: for ``images_per_class < 1``.

    Example:
        >>> import tempfile
        >>> from datasets import load_dataset
        >>> root = write_task_dataset(tempfile.mkdtemp(), SCENE_TASKS["dusk-pairs"], images_per_class=1)
        >>> load_dataset("imagefolder", data_dir=root, split="train").features["label"].names[:3]
        ['blue circle', 'blue square', 'blue triangle']
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
