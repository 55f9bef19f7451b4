"""Image transforms for CLIP: a PIL image -> a normalised ``[3, H, W]`` float32 tensor.

Both transforms use the model's own image processor settings (sizes, resample filter, rescale factor,
mean and std), read from it, never hard-coded, and need only PIL and torch:

- :func:`build_eval_transform`: the processor's resize and center crop; equals the processor's output.
- :func:`build_train_transform`: the paper's random-resized-crop (bicubic) and horizontal flip, then the
  processor's rescale and normalisation. View ``v`` of image ``i`` is a pure function of
  ``(seed, i, v)``, on any process, so augmented views can be cached as frozen features.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from peft_clip_adapter.images import load_image

__all__ = ["ImageTransform", "build_eval_transform", "build_train_transform"]


def check_index(name: str, value: Any) -> None:
    """Check a seed, an image index or a view number: an integer >= 0.

    Args:
        name: What ``value`` is, for the error message.
        value: The value to check.

    Raises:
        ValueError: naming ``name`` and ``value`` unless ``value`` is an integer >= 0 (not a bool).

    Example:
        >>> check_index("view", -1)
        Traceback (most recent call last):
        ...
        ValueError: view must be an integer >= 0, got -1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


@dataclass(frozen=True)
class _ProcessorSteps:
    """What a CLIP-style image processor does, read once from it (no mean/std of our own)."""

    resize: tuple[str, int, int] | None  # ("shortest_edge", n, n) or ("exact", height, width); None: no resize
    resample: int  # PIL resampling filter of the resize
    crop: tuple[int, int] | None  # (height, width) of the center crop; None: no crop
    rescale_factor: float | None  # 1/255 for CLIP; None: no rescale
    mean: tuple[float, ...] | None  # per channel; None: no normalisation
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, processor: Any) -> _ProcessorSteps:
        image_processor = getattr(processor, "image_processor", processor)  # a CLIPProcessor holds one
        if not hasattr(image_processor, "size"):
            raise ValueError(
                f"{type(processor).__name__} is not an image processor; pass AutoProcessor.from_pretrained(...)"
                " or its .image_processor."
            )
        resize = None
        if getattr(image_processor, "do_resize", False):
            resize = _resize_rule(image_processor.size)
        crop = None
        if getattr(image_processor, "do_center_crop", False):
            size = image_processor.crop_size
            crop = (int(_size_field(size, "height")), int(_size_field(size, "width")))
        normalise = getattr(image_processor, "do_normalize", False)
        return cls(
            resize=resize,
            resample=_pil_filter(getattr(image_processor, "resample", None)),
            crop=crop,
            rescale_factor=float(image_processor.rescale_factor)
            if getattr(image_processor, "do_rescale", False)
            else None,
            mean=_per_channel(image_processor.image_mean) if normalise else None,
            std=_per_channel(image_processor.image_std) if normalise else None,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every processed image: the crop size, else a fixed resize size."""
        if self.crop is not None:
            return self.crop
        if self.resize is not None and self.resize[0] == "exact":
            return self.resize[1], self.resize[2]
        raise ValueError(
            "The image processor neither center-crops nor resizes to a fixed height and width, so its images "
            "have no fixed size to random-crop to; set crop_size/do_center_crop or size={'height', 'width'}."
        )

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        if self.resize is not None:
            image = image.resize(_resized_shape(image, self.resize)[::-1], resample=self.resample)  # PIL: (w, h)
        if self.crop is not None:
            height, width = self.crop
            # Same offsets as the processor's center crop; PIL pads with black where the crop leaves the image.
            top, left = (image.height - height) // 2, (image.width - width) // 2
            image = image.crop((left, top, left + width, top + height))
        return image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        # numpy rather than torch: single-threaded, so small images do not pay for a thread pool, and the
        # same arithmetic as the processor (scale in float64, cast to float32, then normalise).
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        scaled = pixels * np.float64(self.rescale_factor) if self.rescale_factor is not None else pixels
        pixels = scaled.astype(np.float32)  # [H, W, 3]
        if self.mean is not None:
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)  # [3] each
            pixels = (pixels - mean) / std  # [H, W, 3], per channel
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, H, W] float32

    def describe(self) -> str:
        return (
            f"resize={self.resize} resample={self.resample} crop={self.crop} rescale={self.rescale_factor!r} "
            f"mean={self.mean} std={self.std}"
        )


def _size_field(size: Any, key: str) -> Any:
    """A field of a processor size: a ``SizeDict`` in transformers 5, a plain dict in saved configs."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resize_rule(size: Any) -> tuple[str, int, int]:
    height, width, shortest = (_size_field(size, key) for key in ("height", "width", "shortest_edge"))
    others = {
        key: _size_field(size, key)
        for key in ("longest_edge", "max_height", "max_width")
        if _size_field(size, key) is not None
    }
    if shortest is not None and height is None and width is None and not others:
        return ("shortest_edge", int(shortest), int(shortest))
    if height is not None and width is not None and shortest is None and not others:
        return ("exact", int(height), int(width))
    raise ValueError(
        f"Unsupported image processor size {size}; accepted forms are {{'shortest_edge': n}} and "
        "{'height': h, 'width': w}."
    )


def _resized_shape(image: Image.Image, rule: tuple[str, int, int]) -> tuple[int, int]:
    """(height, width) after resizing, with the processor's rounding for the shortest-edge rule."""
    kind, height, width = rule
    if kind == "exact":
        return height, width
    short, long = sorted((image.height, image.width))
    new_long = int(height * long / short)  # truncation, as transformers' get_resize_output_image_size
    return (new_long, height) if image.height > image.width else (height, new_long)


def _pil_filter(resample: Any) -> int:
    if resample is None:
        return int(Image.Resampling.BILINEAR)  # the processor's own fallback
    if hasattr(resample, "value") and isinstance(resample.value, str):  # e.g. torchvision's InterpolationMode
        return int(Image.Resampling[resample.value.upper()])
    return int(resample)


def _per_channel(values: float | Sequence[float]) -> tuple[float, ...]:
    values = (values,) * 3 if isinstance(values, (int, float)) else tuple(values)
    if len(values) != 3:
        raise ValueError(f"Expected one image mean/std value per RGB channel, got {list(values)}.")
    return tuple(float(value) for value in values)


class ImageTransform(abc.ABC):
    """An image -> ``[3, H, W]`` float32 tensor transform, ready for CLIP's vision tower.

    ``transform(image, index=i, view=v)`` takes anything :func:`load_image` reads. ``index`` (the image's
    row) and ``view`` (the augmentation number) pick the random augmentation of a train transform; an eval
    transform ignores them. ``description`` identifies the transform's settings in feature-cache keys.
    ``build_train_transform`` and ``build_eval_transform`` return instances; a subclass of your own needs a
    stable ``description`` and ``__call__``.

    Example:
        >>> class Gray(ImageTransform):
        ...     description = "gray 8 px"
        ...     def __call__(self, image, *, index=0, view=0):
        ...         return torch.full((3, 8, 8), 0.5)
        >>> Gray()(None).shape, Gray()
        (torch.Size([3, 8, 8]), Gray(gray 8 px))
    """

    description: str

    @abc.abstractmethod
    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor:
        """The processed image ``[3, H, W]`` float32."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class _EvalTransform(ImageTransform):
    def __init__(self, steps: _ProcessorSteps) -> None:
        self.steps = steps
        self.description = f"eval {steps.describe()}"

    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor:
        return self.steps.to_tensor(self.steps.resize_and_crop(load_image(image)))  # [3, H, W]


class _TrainTransform(ImageTransform):
    def __init__(
        self,
        steps: _ProcessorSteps,
        *,
        seed: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip_probability: float,
        resample: int,
    ) -> None:
        self.steps, self.seed, self.scale, self.ratio = steps, seed, scale, ratio
        self.flip_probability, self.resample = flip_probability, resample
        self.size = steps.output_size  # (height, width) of every crop
        self.description = (
            f"train random-resized-crop size={self.size} scale={scale} ratio={ratio} resample={resample} "
            f"flip={flip_probability} seed={seed} then rescale={steps.rescale_factor!r} mean={steps.mean} "
            f"std={steps.std}"
        )

    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor:
        check_index("index", index)
        check_index("view", view)
        image = load_image(image)
        rng = np.random.default_rng([self.seed, int(index), int(view)])  # this image's view, on any process
        top, left, height, width = _random_resized_crop_box(rng, image.height, image.width, self.scale, self.ratio)
        crop = image.crop((left, top, left + width, top + height))
        crop = crop.resize(self.size[::-1], resample=self.resample)  # PIL takes (width, height)
        if rng.random() < self.flip_probability:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.steps.to_tensor(crop)  # [3, H, W]


def _random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, by torchvision's RandomResizedCrop rule."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    # Ten misses (a very elongated image): fall back to the largest central crop within the ratio range.
    if width / height < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        crop_height, crop_width = height, round(height * ratio[1])
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def build_eval_transform(image_processor: Any) -> ImageTransform:
    """The processor's own resize and center crop, then its rescale and normalisation.

    The result equals ``image_processor(images=image).pixel_values[0]`` (to float rounding), written with
    PIL and torch only.

    Args:
        image_processor: The model's image processor (``CLIPImageProcessor``), or a processor holding one.

    Returns:
        An :class:`ImageTransform` that ignores ``index`` and ``view``.

    Raises:
        ValueError: for an object that is not an image processor, or a resize rule other than
            ``{"shortest_edge": n}`` or ``{"height": h, "width": w}``.

    Example:
        >>> from PIL import Image
        >>> from transformers import CLIPImageProcessor
        >>> processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> pixels = build_eval_transform(processor)(Image.new("RGB", (64, 48), "white"))
        >>> pixels.shape, pixels.dtype
        (torch.Size([3, 32, 32]), torch.float32)
    """
    return _EvalTransform(_ProcessorSteps.from_processor(image_processor))


def build_train_transform(
    image_processor: Any,
    *,
    seed: int = 0,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    resample: int = Image.Resampling.BICUBIC,
) -> ImageTransform:
    """The paper's train augmentation: random-resized-crop and horizontal flip, then the processor's scaling.

    The crop covers a random ``scale`` share of the image with a random aspect ratio in ``ratio`` (the
    rule of torchvision's ``RandomResizedCrop``), is resized to the processor's crop size and flipped with
    probability ``flip_probability``; then the processor's rescale and mean/std normalisation apply. The
    randomness of ``transform(image, index=i, view=v)`` comes from ``(seed, i, v)`` alone.

    Args:
        image_processor: The model's image processor, or a processor holding one.
        seed: Seed of the augmentations (integer >= 0).
        scale: Range of the crop's share of the image area, ``0 < low <= high <= 1``.
        ratio: Range of the crop's aspect ratio (width / height), ``0 < low <= high``.
        flip_probability: Probability of a horizontal flip, in [0, 1].
        resample: PIL filter of the crop's resize (bicubic, as in the paper).

    Returns:
        An :class:`ImageTransform`, deterministic in ``(seed, index, view)``.

    Raises:
        ValueError: for a bad seed, scale, ratio or flip probability, or a processor without a fixed output
            size.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from transformers import CLIPImageProcessor
        >>> processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> transform = build_train_transform(processor, seed=0)
        >>> image = Image.effect_noise((64, 48), 40)
        >>> torch.equal(transform(image, index=3, view=1), transform(image, index=3, view=1))
        True
        >>> torch.equal(transform(image, index=3, view=1), transform(image, index=3, view=2))
        False
    """
    check_index("seed", seed)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}.")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}.")
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability!r}.")
    return _TrainTransform(
        _ProcessorSteps.from_processor(image_processor),
        seed=int(seed),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
        flip_probability=float(flip_probability),
        resample=int(resample),
    )
