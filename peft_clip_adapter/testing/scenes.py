"""Generated captioned images: one shape per image, with a colour, size, texture, position, and a caption.

A small world a CLIP learns from scratch in a minute on a CPU (``testing.microclip``) and few-shot tasks are
drawn from (``testing.scene_tasks``). Everything is a pure function of a ``torch.Generator``::

    generator = torch.Generator().manual_seed(0)
    scenes = sample_scenes(8, generator)
    images = render_scenes(scenes, generator)  # [8, 3, 32, 32] uint8
    captions = caption_scenes(scenes, generator)  # "a photo of a large red striped circle on the left."

Captions always name the shape and name the other attributes with fixed probabilities, so the model learns
each word alone and in combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
#: Colour names and their RGB values (each image jitters them a little).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 50, 200),
    "orange": (240, 140, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
#: How captions say where the shape is.
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
#: Image-level shifts: ``"dusk"`` is a dim, low-contrast, slightly blurred and noisy camera, never seen
#: in pretraining.
SHIFTS: tuple[str, ...] = ("none", "dusk")

#: Caption templates of the grammar (the few-shot trainer's default prompt is the first).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
)
# How often a caption names each attribute (the shape is always named).
_MENTION = {"size": 0.5, "colour": 0.85, "texture": 0.5, "position": 0.4}


@dataclass(frozen=True)
class Scenes:
    """The attributes of ``N`` scenes: ``[N]`` int64 indices into ``SHAPES``, ``COLOURS``, ... ``POSITIONS``.

    Raises ``ValueError`` for attributes of different lengths or indices out of range.
    """

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    texture: torch.Tensor
    position: torch.Tensor

    def __post_init__(self) -> None:
        limits = {
            "shape": len(SHAPES),
            "colour": len(COLOURS),
            "size": len(SIZES),
            "texture": len(TEXTURES),
            "position": len(POSITIONS),
        }
        lengths = {len(getattr(self, name)) for name in limits}
        if len(lengths) != 1:
            raise ValueError(f"Scene attributes must have one length, got lengths {sorted(lengths)}.")
        for name, limit in limits.items():
            values = getattr(self, name)
            if len(values) and (values.min() < 0 or values.max() >= limit):
                raise ValueError(f"Scene {name} indices must be in [0, {limit}), got {values.tolist()}.")

    def __len__(self) -> int:
        return len(self.shape)

    def describe(self, index: int) -> str:
        """Every attribute of scene ``index`` in words, e.g. ``"small red plain circle in the center"``."""
        colour = list(COLOURS)[self.colour[index]]
        return (
            f"{SIZES[self.size[index]]} {colour} {TEXTURES[self.texture[index]]} {SHAPES[self.shape[index]]} "
            f"{POSITION_PHRASES[POSITIONS[self.position[index]]]}"
        )


def vocabulary() -> list[str]:
    """Every word a caption or a task's prompt can use, sorted (for the tokenizer)."""
    words = {*SHAPES, *COLOURS, *SIZES, *TEXTURES}
    for text in (*POSITION_PHRASES.values(), *CAPTION_TEMPLATES):
        words.update(text.replace("{}", " ").replace(".", " ").split())
    return sorted(words)


def sample_scenes(count: int, generator: torch.Generator, *, exclude_pairs: Sequence[tuple[str, str]] = ()) -> Scenes:
    """Draw ``count`` scenes with uniform attributes, redrawing the colour of any (shape, colour) in ``exclude_pairs``.

    Raises ``ValueError`` for an unknown name in ``exclude_pairs``, or pairs that leave a shape no colour.
    """
    excluded = torch.zeros(len(SHAPES), len(COLOURS), dtype=torch.bool)
    for shape, colour in exclude_pairs:
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(
                f"exclude_pairs holds {(shape, colour)!r}; use shapes {SHAPES} and colours {tuple(COLOURS)}."
            )
        excluded[SHAPES.index(shape), list(COLOURS).index(colour)] = True
    if excluded.all(dim=1).any():
        raise ValueError("exclude_pairs leaves a shape without any colour to draw it in.")
    shape = torch.randint(len(SHAPES), (count,), generator=generator)
    colour = torch.randint(len(COLOURS), (count,), generator=generator)
    clash = excluded[shape, colour]
    while clash.any():  # redraw the colour of excluded pairs until none is left
        colour[clash] = torch.randint(len(COLOURS), (int(clash.sum()),), generator=generator)
        clash = excluded[shape, colour]
    return Scenes(
        shape,
        colour,
        torch.randint(len(SIZES), (count,), generator=generator),
        torch.randint(len(TEXTURES), (count,), generator=generator),
        torch.randint(len(POSITIONS), (count,), generator=generator),
    )


def render_scenes(scenes: Scenes, generator: torch.Generator, *, image_size: int = 32) -> torch.Tensor:
    """Draw the scenes, ``[N, 3, image_size, image_size]`` uint8: a jittered shape over a slightly noisy background."""
    count, side = len(scenes), image_size
    ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")  # [H, W]
    offsets = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]) * 0.2 * side
    centre = side / 2 + offsets[scenes.position] + (torch.rand(count, 2, generator=generator) - 0.5) * 0.08 * side
    radius = torch.tensor([0.2, 0.3])[scenes.size] * side * (0.9 + 0.2 * torch.rand(count, generator=generator))
    u = (xs - centre[:, 0, None, None]) / radius[:, None, None]  # [N, H, W], shape coordinates in radii
    v = (ys - centre[:, 1, None, None]) / radius[:, None, None]
    mask = _shape_mask(scenes.shape, u, v)  # [N, H, W]
    column, row = xs - 0.5, ys - 0.5
    patterns = torch.stack(
        [
            torch.ones(side, side, dtype=torch.bool),  # plain
            ((column + row) // 3) % 2 == 0,  # diagonal stripes
            (column // 3 + row // 3) % 2 == 0,  # checkerboard
        ]
    )  # [3, H, W]
    lit = patterns[scenes.texture]  # [N, H, W]
    base = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[scenes.colour]  # [N, 3]
    base = base + (torch.rand(count, 3, generator=generator) - 0.5) * 40
    foreground = torch.where(lit[:, None], base[:, :, None, None], 0.6 * base[:, :, None, None])  # [N, 3, H, W]
    background = 40 + 70 * torch.rand(count, 3, 1, 1, generator=generator)
    background = background + (torch.rand(count, 3, side, side, generator=generator) - 0.5) * 20
    images = torch.where(mask[:, None], foreground, background)
    return images.clamp(0, 255).round().to(torch.uint8)


def _shape_mask(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-shape mask ``[N, H, W]`` of each scene's shape, in coordinates scaled by its radius."""
    radial = u * u + v * v
    masks = torch.stack(
        [
            radial <= 1,  # circle
            torch.maximum(u.abs(), v.abs()) <= 0.85,  # square
            (v <= 0.8) & (u.abs() <= (v + 1) / 1.8),  # triangle, apex up
            ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),  # cross
            u.abs() + v.abs() <= 1.1,  # diamond
            (radial <= 1) & (radial >= 0.45),  # ring
        ],
        dim=1,
    )  # [N, shapes, H, W]
    return masks[torch.arange(len(shape)), shape]


def caption_scenes(scenes: Scenes, generator: torch.Generator) -> list[str]:
    """One caption per scene from the grammar, e.g. ``"a picture of a small striped ring on the left."``."""
    mention = torch.rand(len(scenes), 4, generator=generator)
    thresholds = torch.tensor([_MENTION["size"], _MENTION["colour"], _MENTION["texture"], _MENTION["position"]])
    named = (mention < thresholds).tolist()
    templates = torch.randint(len(CAPTION_TEMPLATES), (len(scenes),), generator=generator).tolist()
    colours = list(COLOURS)
    captions = []
    for index, (size, colour, texture, position) in enumerate(named):
        words = [SIZES[scenes.size[index]]] if size else []
        words += [colours[scenes.colour[index]]] if colour else []
        words += [TEXTURES[scenes.texture[index]]] if texture else []
        phrase = " ".join([*words, SHAPES[scenes.shape[index]]])
        if position:
            phrase += f" {POSITION_PHRASES[POSITIONS[scenes.position[index]]]}"
        captions.append(CAPTION_TEMPLATES[templates[index]].format(phrase))
    return captions


def apply_shift(images: torch.Tensor, shift: str, generator: torch.Generator) -> torch.Tensor:
    """An image-level distribution shift of ``[N, 3, H, W]`` uint8 scenes (the input itself for ``"none"``).

    ``"dusk"`` dims to 55 % brightness, blurs with a 3 x 3 box and adds Gaussian noise (sigma 6 of 255).
    Raises ``ValueError`` for a shift not in ``SHIFTS``.
    """
    if shift not in SHIFTS:
        raise ValueError(f"Unknown shift {shift!r}; choose one of {SHIFTS}.")
    if shift == "none":
        return images
    pixels = 0.55 * images.float()
    pixels = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pixels = pixels + 6.0 * torch.randn(pixels.shape, generator=generator)
    return pixels.clamp(0, 255).round().to(torch.uint8)
