"""Image transforms: an image -> the vision tower's input, with the model's own processor settings.

``build_eval_transform`` is the processor's resize and center crop; ``build_train_transform`` the paper's
random-resized-crop (bicubic) and flip. View ``v`` of image ``i`` is a pure function of ``(seed, i, v)`` on
any process, so augmented views can be cached as frozen features. For a fixed-size processor (CLIP, SigLIP)
every view is a box of the source resampled to the output size, so extraction decodes an image once for all
its views (a large JPEG at reduced scale) and can make them on the accelerator (``inputs.resample``). For
SigLIP 2 NaFlex the processor itself makes the inputs (``NaFlexTransform``).
"""

from __future__ import annotations

import abc
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from peft_clip_adapter.fewshot.inputs.images import DecodedImage, load_image, load_image_draft, to_rgb

__all__ = [
    "ImageTransform",
    "NaFlexTransform",
    "ResizedCropTransform",
    "ViewBox",
    "build_eval_transform",
    "build_train_transform",
    "is_naflex_processor",
    "move_model_inputs",
    "stack_model_inputs",
]


def check_index(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` (a seed, image index or view) is an integer >= 0."""
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

    @functools.cached_property
    def lut(self) -> torch.Tensor:
        """``[3, 256]`` float32: the rescaled, normalised value of each 8-bit level, per channel.

        Computed with the processor's arithmetic (scale in float64, cast to float32, then ``(x - mean) /
        std`` in float32), so looking a pixel up gives the same bits as computing it, on any device.
        """
        levels = np.arange(256, dtype=np.uint8)
        scaled = levels * np.float64(self.rescale_factor) if self.rescale_factor is not None else levels
        values = np.broadcast_to(scaled.astype(np.float32), (3, 256))  # [3, 256]
        if self.mean is not None:
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)  # [3] each
            values = (values - mean[:, None]) / std[:, None]  # [3, 256], per channel
        return torch.from_numpy(np.ascontiguousarray(values))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[..., 3, H, W]`` uint8 -> float32 on the same device: rescale and normalise by table look-up."""
        lut = self.lut.to(pixels.device)
        values = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)  # [..., 3, H, W]
        for channel in range(3):
            levels = pixels[..., channel, :, :]  # [..., H, W]
            # index_select with int32 indices: the fastest look-up on CPU and GPU alike.
            picked = torch.index_select(lut[channel], 0, levels.reshape(-1).to(torch.int32))
            values[..., channel, :, :] = picked.view(levels.shape)
        return values

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


def _resized_shape(image_height: int, image_width: int, rule: tuple[str, int, int] | None) -> tuple[int, int]:
    """(height, width) after resizing, with the processor's rounding for the shortest-edge rule."""
    if rule is None:
        return image_height, image_width
    kind, height, width = rule
    if kind == "exact":
        return height, width
    short, long = sorted((image_height, image_width))
    new_long = int(height * long / short)  # truncation, as transformers' get_resize_output_image_size
    return (new_long, height) if image_height > image_width else (height, new_long)


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
    """An image -> ``[3, H, W]`` float32 (or the model's inputs by name) transform for the vision tower.

    ``transform(image, index=i, view=v)`` takes anything ``load_image`` reads; ``index`` and ``view`` pick a
    train transform's augmentation and an eval transform ignores them. A subclass needs ``__call__`` and a stable
    ``description``, which keys the feature cache. A dict returned by ``__call__`` is stacked per name and passed
    to the model as keyword arguments (``stack_model_inputs``).
    """

    description: str

    @abc.abstractmethod
    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
        """The processed image ``[3, H, W]`` float32, or the model's inputs by name."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


def stack_model_inputs(outputs: Sequence[torch.Tensor | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-image transform outputs into the model's keyword inputs: ``{name: [len(outputs), ...]}``.

    A tensor becomes ``pixel_values``; dicts (NaFlex) are stacked name by name.

    Example:
        >>> stack_model_inputs([torch.zeros(3, 8, 8)] * 2)["pixel_values"].shape
        torch.Size([2, 3, 8, 8])
    """
    if isinstance(outputs[0], dict):
        return {name: torch.stack([output[name] for output in outputs]) for name in outputs[0]}
    return {"pixel_values": torch.stack(list(outputs))}


def move_model_inputs(
    inputs: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The inputs on ``device``, floating-point ones cast to ``dtype`` (masks and shapes stay integers)."""
    return {
        name: value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
    }


class ViewBox(NamedTuple):
    """Where one view comes from: a box of the source, resampled, windowed and maybe flipped.

    Attributes:
        box: ``(left, top, right, bottom)`` in source pixels at full size (floats).
        resized: ``(height, width)`` the box is resampled to.
        offset: ``(top, left)`` of the output window in the resampled box; black where it reaches past it.
        flip: Whether the window is then mirrored left to right.
    """

    box: tuple[float, float, float, float]
    resized: tuple[int, int]
    offset: tuple[int, int]
    flip: bool


class ResizedCropTransform(ImageTransform):
    """A transform whose every view is a resampled box of the image: the fixed-size train and eval transforms.

    Subclasses say which box a view takes (``view_box``) and how small a box can be (``max_scale``); this class
    decodes (a large JPEG at the reduced scale that allows, if ``draft``), resamples with PIL's ``resample``
    filter, windows, flips and normalises.
    """

    def __init__(self, steps: _ProcessorSteps, *, resample: int, draft: bool) -> None:
        self.steps, self.resample, self.draft = steps, int(resample), bool(draft)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every view, or ``None`` when it depends on the image."""
        try:
            return self.steps.output_size
        except ValueError:
            return None

    @abc.abstractmethod
    def view_box(self, width: int, height: int, *, index: int, view: int) -> ViewBox:
        """The ``ViewBox`` of view ``view`` of image ``index``, for a ``width x height`` source."""

    @abc.abstractmethod
    def max_scale(self, width: int, height: int) -> float:
        """How many times larger than its resampled size the smallest box of such an image can be.

        Decoding at up to this scale keeps every box at or above the output's resolution.
        """

    def decode(self, image: Any) -> DecodedImage:
        """Read ``image`` as ``load_image`` does, at reduced scale where ``draft`` allows."""
        return load_image_draft(image, self.max_scale if self.draft else None)

    def view_boxes(self, decoded: DecodedImage, *, index: int, views: Sequence[int]) -> list[ViewBox]:
        """The boxes of ``views`` of image ``index`` in the decoded image's pixels (its scale applied)."""
        check_index("index", index)
        boxes = []
        for view in views:
            check_index("view", view)
            box = self.view_box(*decoded.size, index=int(index), view=int(view))
            boxes.append(box._replace(box=tuple(float(value) / decoded.scale for value in box.box)))
        return boxes

    def render(self, decoded: DecodedImage, box: ViewBox) -> Image.Image:
        """One view as an 8-bit RGB PIL image: the box resampled, windowed and flipped."""
        image = decoded.image
        height, width = box.resized
        if box.box != (0.0, 0.0, float(image.width), float(image.height)) or (width, height) != image.size:
            image = image.resize((width, height), resample=self.resample, box=box.box)  # PIL takes (w, h)
        window = self.output_size or box.resized
        if tuple(box.offset) != (0, 0) or tuple(window) != box.resized:
            top, left = box.offset
            # Same offsets as the processor's center crop; PIL pads with black where the window leaves the image.
            image = image.crop((left, top, left + window[1], top + window[0]))
        if box.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def crops(self, image: Any, *, index: int, views: Sequence[int]) -> torch.Tensor:
        """Decode ``image`` once and make ``views``, un-normalised: ``[len(views), 3, H, W]`` uint8."""
        decoded = self.decode(image)
        pixels = [np.asarray(self.render(decoded, box)) for box in self.view_boxes(decoded, index=index, views=views)]
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # [V, 3, H, W]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rescale and normalise ``[..., 3, H, W]`` uint8 -> float32 on the same device, bit-exact on any device."""
        return self.steps.normalise(pixels)

    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor:
        return self.normalise(self.crops(image, index=index, views=[view])[0])  # [3, H, W]


class _EvalTransform(ResizedCropTransform):
    def __init__(self, steps: _ProcessorSteps, *, draft: bool) -> None:
        super().__init__(steps, resample=steps.resample, draft=draft)
        self.description = f"eval {steps.describe()} draft={self.draft}"

    def view_box(self, width: int, height: int, *, index: int, view: int) -> ViewBox:
        resized = _resized_shape(height, width, self.steps.resize)
        offset = (0, 0)
        if self.steps.crop is not None:
            offset = ((resized[0] - self.steps.crop[0]) // 2, (resized[1] - self.steps.crop[1]) // 2)
        return ViewBox((0.0, 0.0, float(width), float(height)), resized, offset, False)

    def max_scale(self, width: int, height: int) -> float:
        resized_height, resized_width = _resized_shape(height, width, self.steps.resize)
        return min(width / resized_width, height / resized_height)


@dataclass(frozen=True)
class _Augmentation:
    """The paper's random crop and flip, by torchvision's ``RandomResizedCrop`` rule, seeded per view.

    The train transforms of fixed-size and of NaFlex processors share it, so view ``v`` of image ``i``
    takes the same box and flip with either, on any process.
    """

    seed: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_probability: float

    def sample(self, width: int, height: int, *, index: int, view: int) -> tuple[tuple[int, int, int, int], bool]:
        """``((left, top, right, bottom), flip)`` of view ``view`` of image ``index`` of ``width x height`` pixels."""
        rng = np.random.default_rng([self.seed, int(index), int(view)])  # this image's view, on any process
        top, left, crop_height, crop_width = _random_resized_crop_box(rng, height, width, self.scale, self.ratio)
        flip = bool(rng.random() < self.flip_probability)
        return (left, top, left + crop_width, top + crop_height), flip

    def max_scale(self, width: int, height: int, output_size: tuple[int, int]) -> float:
        """How many times larger than ``output_size`` (height, width) the smallest box can be."""
        # The narrowest and the flattest box _random_resized_crop_box can return (a sampled one, or its
        # fallback), less a pixel for its rounding; the view count does not enter, so view v of image i
        # is decoded alike whatever other views are made with it.
        area, (low_scale, _), (low_ratio, high_ratio) = width * height, self.scale, self.ratio
        narrowest = min(width, math.sqrt(low_scale * area * low_ratio), height * high_ratio) - 1
        flattest = min(height, math.sqrt(low_scale * area / high_ratio), width / low_ratio) - 1
        return min(narrowest / output_size[1], flattest / output_size[0])

    def describe(self) -> str:
        return f"scale={self.scale} ratio={self.ratio} flip={self.flip_probability} seed={self.seed}"


class _TrainTransform(ResizedCropTransform):
    def __init__(self, steps: _ProcessorSteps, *, augmentation: _Augmentation, resample: int, draft: bool) -> None:
        super().__init__(steps, resample=resample, draft=draft)
        self.augmentation = augmentation
        self.size = steps.output_size  # (height, width) of every crop
        # "box-resample": the crop box is resampled from the whole image (one PIL resize with a box), so the
        # filter reads real pixels past the box's edges; cache files of the earlier crop-then-resize differ.
        self.description = (
            f"train random-resized-crop size={self.size} scale={augmentation.scale} ratio={augmentation.ratio} "
            f"resample={self.resample} flip={augmentation.flip_probability} seed={augmentation.seed} box-resample "
            f"draft={self.draft} then rescale={steps.rescale_factor!r} mean={steps.mean} std={steps.std}"
        )

    def view_box(self, width: int, height: int, *, index: int, view: int) -> ViewBox:
        box, flip = self.augmentation.sample(width, height, index=index, view=view)
        return ViewBox(tuple(float(value) for value in box), self.size, (0, 0), flip)

    def max_scale(self, width: int, height: int) -> float:
        return self.augmentation.max_scale(width, height, self.size)


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


def is_naflex_processor(processor: Any) -> bool:
    """Whether ``processor`` (or its ``.image_processor``) makes SigLIP 2 NaFlex inputs, sized from each image.

    Such a processor returns ``pixel_values`` ``[N, max_num_patches, 3 * p * p]``, ``pixel_attention_mask`` and
    ``spatial_shapes``.
    """
    image_processor = getattr(processor, "image_processor", processor)
    return (
        "spatial_shapes" in (getattr(image_processor, "model_input_names", None) or ())
        and getattr(image_processor, "patch_size", None) is not None
        and getattr(image_processor, "max_num_patches", None) is not None
    )


class NaFlexTransform(ImageTransform):
    """SigLIP 2 NaFlex views: the paper's random crop and flip (train), then the model's own processor.

    A train view is the same box and flip ``build_train_transform`` takes for a fixed-size processor with the
    same seed, cut at full resolution (keeping its aspect ratio on the patch grid); an eval view is the whole
    image. Returns ``pixel_values`` ``[max_num_patches, 3 * p * p]`` float32, ``pixel_attention_mask``
    ``[max_num_patches]`` int32 and ``spatial_shapes`` ``[2]`` int64. Views are made on the CPU and decoded in
    full, since the processor sizes the output from the pixels it gets. ``augmentation=None`` makes eval views.
    Raises ``ValueError`` for a processor that does not make NaFlex inputs.
    """

    def __init__(
        self, image_processor: Any, *, augmentation: Optional[_Augmentation] = None, resample: Optional[int] = None
    ) -> None:
        image_processor = getattr(image_processor, "image_processor", image_processor)
        if not is_naflex_processor(image_processor):
            raise ValueError(
                f"{type(image_processor).__name__} does not make NaFlex inputs (patch_size, max_num_patches, "
                "spatial_shapes); build_train_transform / build_eval_transform pick the right transform for it."
            )
        self.image_processor, self.augmentation = image_processor, augmentation
        self.resample = None if augmentation is None or resample is None else int(resample)
        # Every setting of the processor changes the inputs (patch_size, max_num_patches, resample, mean, ...),
        # and its class says which backend (PIL or torchvision) resizes: all of it goes into the cache key.
        settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
        views = "eval" if augmentation is None else f"train crop {augmentation.describe()} resample={self.resample}"
        self.description = f"naflex {views} full-decode then {type(image_processor).__name__} {settings}"

    def view_crop(self, width: int, height: int, *, index: int, view: int) -> tuple[tuple[int, int, int, int], bool]:
        """``((left, top, right, bottom), flip)`` of view ``view`` of image ``index``; the whole image for eval."""
        check_index("index", index)
        check_index("view", view)
        if self.augmentation is None:
            return (0, 0, int(width), int(height)), False
        return self.augmentation.sample(width, height, index=int(index), view=int(view))

    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> dict[str, torch.Tensor]:
        """The processor's inputs for the view: ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``."""
        image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        box, flip = self.view_crop(*image.size, index=index, view=view)
        if box != (0, 0, *image.size):
            image = image.crop(box)  # whole pixels: the processor resizes the crop as it would a photo
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        options = {} if self.resample is None else {"resample": self.resample}
        inputs = self.image_processor(images=image, return_tensors="pt", **options)
        return {name: value[0] for name, value in inputs.items()}  # one image: drop the batch dimension


def build_eval_transform(image_processor: Any, *, draft: bool = True) -> ImageTransform:
    """The processor's own resize and center crop, then its rescale and normalisation.

    Equals ``image_processor(images=image).pixel_values[0]`` to float rounding, with PIL and torch only. With
    ``draft`` a JPEG at least twice the resized size is decoded at 1/2, 1/4 or 1/8 scale (never below the resized
    size). A NaFlex processor gets a ``NaFlexTransform``. Raises ``ValueError`` for something that is not an image
    processor, or a size other than ``{"shortest_edge": n}`` or ``{"height": h, "width": w}``.
    """
    if is_naflex_processor(image_processor):
        return NaFlexTransform(image_processor)
    return _EvalTransform(_ProcessorSteps.from_processor(image_processor), draft=draft)


def build_train_transform(
    image_processor: Any,
    *,
    seed: int = 0,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    resample: int = Image.Resampling.BICUBIC,
    draft: bool = True,
) -> ImageTransform:
    """The paper's train augmentation: random-resized-crop and horizontal flip, then the processor's scaling.

    The crop covers a random ``scale`` share of the area with an aspect ratio (width / height) in ``ratio``
    (torchvision's ``RandomResizedCrop`` rule), resampled with ``resample`` to the processor's crop size and
    flipped with probability ``flip_probability``. View ``v`` of image ``i`` depends on ``(seed, i, v)`` alone.
    With ``draft`` a JPEG is decoded at reduced scale when even the smallest possible crop keeps twice the
    output's pixels. A NaFlex processor gets a ``NaFlexTransform`` with the same boxes. Raises ``ValueError``
    for a bad seed, ``scale`` (``0 < low <= high <= 1``), ``ratio`` (``0 < low <= high``), flip probability, or a
    processor without a fixed output size.
    """
    check_index("seed", seed)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}.")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}.")
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability!r}.")
    augmentation = _Augmentation(
        seed=int(seed),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
        flip_probability=float(flip_probability),
    )
    if is_naflex_processor(image_processor):
        return NaFlexTransform(image_processor, augmentation=augmentation, resample=int(resample))
    steps = _ProcessorSteps.from_processor(image_processor)
    return _TrainTransform(steps, augmentation=augmentation, resample=int(resample), draft=draft)
