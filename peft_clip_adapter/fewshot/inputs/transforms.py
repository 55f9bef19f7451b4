"""Image transforms: a PIL image -> the vision tower's input (a normalised ``[3, H, W]`` float32 tensor).

Both transforms use the model's own image processor settings (sizes, resample filter, rescale factor,
mean and std), read from it, never hard-coded, and need only PIL and torch:

- :func:`build_eval_transform`: the processor's resize and center crop; equals the processor's output.
- :func:`build_train_transform`: the paper's random-resized-crop (bicubic) and horizontal flip, then the
  processor's rescale and normalisation. View ``v`` of image ``i`` is a pure function of
  ``(seed, i, v)``, on any process, so augmented views can be cached as frozen features.

For a fixed-size processor (CLIP, SigLIP) both are a :class:`ResizedCropTransform`: every view is one box
of the source image resampled to the output size (plus, for eval, a center window of it), then flipped or
not, then normalised. That split lets feature extraction decode an image once for all its views, decode a
large JPEG at the reduced scale the smallest box allows (:func:`~.images.load_image_draft`),
and make the views on the accelerator with the same boxes (:mod:`peft_clip_adapter.fewshot.inputs.resample`).

For SigLIP 2 NaFlex, whose processor sizes each image's patch grid from the image itself, both are a
:class:`NaFlexTransform`: the same random box and flip, then the processor itself, which returns the
model's inputs by name (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``).
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
    """An image -> ``[3, H, W]`` float32 tensor transform (or -> the model's inputs by name), for the vision tower.

    ``transform(image, index=i, view=v)`` takes anything :func:`load_image` reads. ``index`` (the image's
    row) and ``view`` (the augmentation number) pick the random augmentation of a train transform; an eval
    transform ignores them. ``description`` identifies the transform's settings in feature-cache keys.
    ``build_train_transform`` and ``build_eval_transform`` return instances; a subclass of your own needs a
    stable ``description`` and ``__call__``. Feature extraction decodes each image once (with
    :func:`load_image`) and calls ``__call__`` with the decoded PIL image for every view. ``__call__`` may
    also return a dict of tensors (as :class:`NaFlexTransform` does): they are then stacked per name and
    passed to the model as keyword arguments (:func:`stack_model_inputs`).

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
    def __call__(self, image: Any, *, index: int = 0, view: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
        """The processed image ``[3, H, W]`` float32, or the model's inputs by name."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


def stack_model_inputs(outputs: Sequence[torch.Tensor | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack what a transform returned for several images (or views) into the model's keyword inputs.

    A tensor is ``pixel_values``; a dict (a NaFlex processor's ``pixel_values``, ``pixel_attention_mask``
    and ``spatial_shapes``) is stacked name by name.

    Args:
        outputs: One transform output per image, all of the same kind (at least one).

    Returns:
        ``{name: [len(outputs), ...]}``.

    Example:
        >>> stack_model_inputs([torch.zeros(3, 8, 8)] * 2)["pixel_values"].shape
        torch.Size([2, 3, 8, 8])
        >>> view = {"pixel_values": torch.zeros(16, 192), "spatial_shapes": torch.tensor([2, 8])}
        >>> {name: tuple(value.shape) for name, value in stack_model_inputs([view] * 3).items()}
        {'pixel_values': (3, 16, 192), 'spatial_shapes': (3, 2)}
    """
    if isinstance(outputs[0], dict):
        return {name: torch.stack([output[name] for output in outputs]) for name in outputs[0]}
    return {"pixel_values": torch.stack(list(outputs))}


def move_model_inputs(
    inputs: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's inputs on ``device``, floating-point ones in the model's ``dtype`` (masks and shapes stay integers).

    Args:
        inputs: From :func:`stack_model_inputs`.
        device: The model's device.
        dtype: The model's floating-point dtype.

    Returns:
        The moved inputs, by the same names.

    Example:
        >>> inputs = {"pixel_values": torch.zeros(1, 4), "spatial_shapes": torch.tensor([[2, 2]])}
        >>> {name: value.dtype for name, value in move_model_inputs(inputs, "cpu", torch.bfloat16).items()}
        {'pixel_values': torch.bfloat16, 'spatial_shapes': torch.int64}
    """
    return {
        name: value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
    }


class ViewBox(NamedTuple):
    """Where one view of an image comes from: a box of the source, resampled, windowed and maybe flipped.

    Attributes:
        box: ``(left, top, right, bottom)`` of the source region, in source pixels at full size (floats).
        resized: ``(height, width)`` the box is resampled to.
        offset: ``(top, left)`` of the output window inside the resampled box; the window may reach past
            it (an eval crop larger than the resized image), and is black there, as PIL's ``crop``.
        flip: Whether the window is then mirrored left to right.

    Example:
        >>> ViewBox(box=(0.0, 0.0, 64.0, 48.0), resized=(32, 42), offset=(0, 5), flip=False).offset
        (0, 5)
    """

    box: tuple[float, float, float, float]
    resized: tuple[int, int]
    offset: tuple[int, int]
    flip: bool


class ResizedCropTransform(ImageTransform):
    """A transform whose every view is a resampled box of the image: the train and eval transforms.

    A subclass says which box each view takes (:meth:`view_box`) and how small a box it can ever take
    (:meth:`max_scale`); this class decodes (a large JPEG at the reduced scale the smallest box allows,
    if ``draft``), resamples with PIL's filter, windows, flips and normalises, all with the model's own
    image processor settings. Feature extraction decodes each image once for all its views, and can make
    the views on the accelerator instead (:func:`.resample.render_views`), with the same
    boxes.

    Args:
        steps: The processor's settings (read once with ``_ProcessorSteps.from_processor``).
        resample: PIL filter of the resize.
        draft: Decode a JPEG at 1/2, 1/4 or 1/8 scale when every box the transform can cut still holds at
            least the output's pixels at that scale.

    Example:
        >>> from PIL import Image
        >>> from transformers import CLIPImageProcessor
        >>> processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> transform = build_train_transform(processor, seed=0)
        >>> isinstance(transform, ResizedCropTransform), tuple(transform.crops(Image.new("RGB", (64, 48)),
        ...     index=0, views=[0, 1]).shape)
        (True, (2, 3, 32, 32))
    """

    def __init__(self, steps: _ProcessorSteps, *, resample: int, draft: bool) -> None:
        self.steps, self.resample, self.draft = steps, int(resample), bool(draft)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every view, or ``None`` when it depends on the image (no crop, no fixed size).

        Example:
            >>> from transformers import CLIPImageProcessor
            >>> build_eval_transform(CLIPImageProcessor(crop_size={"height": 24, "width": 24})).output_size
            (24, 24)
        """
        try:
            return self.steps.output_size
        except ValueError:
            return None

    @abc.abstractmethod
    def view_box(self, width: int, height: int, *, index: int, view: int) -> ViewBox:
        """The :class:`ViewBox` of view ``view`` of image ``index``, for a source of ``width x height`` pixels.

        Args:
            width: Source width at full size.
            height: Source height at full size.
            index: The image's row.
            view: The augmentation number.

        Returns:
            The view's box, resampled size, window offset and flip.

        Example:
            See :meth:`max_scale`.
        """

    @abc.abstractmethod
    def max_scale(self, width: int, height: int) -> float:
        """How many times larger than its resampled size the smallest box of such an image can be.

        Decoding at a scale up to this keeps every box at or above the output's resolution.

        Args:
            width: Source width at full size.
            height: Source height at full size.

        Returns:
            ``min(box width / resized width, box height / resized height)`` over every possible box.

        Example:
            >>> from transformers import CLIPImageProcessor
            >>> transform = build_eval_transform(CLIPImageProcessor())  # 224 px
            >>> transform.view_box(4000, 3000, index=0, view=0).resized, round(transform.max_scale(4000, 3000), 2)
            ((224, 298), 13.39)
        """

    def decode(self, image: Any) -> DecodedImage:
        """Read ``image`` (anything :func:`load_image` reads), at reduced scale where ``draft`` allows.

        Args:
            image: A PIL image, file path, encoded bytes or ``{"path", "bytes"}`` dict.

        Returns:
            The :class:`~peft_clip_adapter.fewshot.inputs.images.DecodedImage` (pixels, scale, full size).

        Raises:
            ValueError: for an unreadable image, naming the file.

        Example:
            >>> from PIL import Image
            >>> from transformers import CLIPImageProcessor
            >>> build_eval_transform(CLIPImageProcessor()).decode(Image.new("RGB", (8, 6))).scale
            1
        """
        return load_image_draft(image, self.max_scale if self.draft else None)

    def view_boxes(self, decoded: DecodedImage, *, index: int, views: Sequence[int]) -> list[ViewBox]:
        """The boxes of ``views`` of image ``index``, in the pixels of ``decoded`` (its scale applied).

        Args:
            decoded: The image, from :meth:`decode`.
            index: The image's row.
            views: View numbers.

        Returns:
            One :class:`ViewBox` per view; ``box`` divided by the decoding scale.

        Raises:
            ValueError: for a negative or non-integer index or view.

        Example:
            >>> from PIL import Image
            >>> from transformers import CLIPImageProcessor
            >>> transform = build_eval_transform(CLIPImageProcessor())
            >>> transform.view_boxes(transform.decode(Image.new("RGB", (448, 224))), index=0, views=[0])[0].box
            (0.0, 0.0, 448.0, 224.0)
        """
        check_index("index", index)
        boxes = []
        for view in views:
            check_index("view", view)
            box = self.view_box(*decoded.size, index=int(index), view=int(view))
            boxes.append(box._replace(box=tuple(float(value) / decoded.scale for value in box.box)))
        return boxes

    def render(self, decoded: DecodedImage, box: ViewBox) -> Image.Image:
        """One view as an 8-bit RGB PIL image: the box resampled (PIL, ``resample``), windowed, flipped.

        Args:
            decoded: The image, from :meth:`decode`.
            box: One of :meth:`view_boxes` (in the decoded image's pixels).

        Returns:
            The view, ``output_size`` (or the resampled size, when there is no window).

        Example:
            >>> from PIL import Image
            >>> from transformers import CLIPImageProcessor
            >>> transform = build_eval_transform(CLIPImageProcessor())
            >>> decoded = transform.decode(Image.new("RGB", (448, 224)))
            >>> transform.render(decoded, transform.view_boxes(decoded, index=0, views=[0])[0]).size
            (224, 224)
        """
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
        """Decode ``image`` once and make the given views, un-normalised: ``[V, 3, H, W]`` uint8.

        Args:
            image: Anything :func:`load_image` reads.
            index: The image's row.
            views: View numbers.

        Returns:
            ``[len(views), 3, H, W]`` uint8; :meth:`normalise` turns it into the model's input.

        Raises:
            ValueError: for an unreadable image (named), or a bad index or view.

        Example:
            See the class example.
        """
        decoded = self.decode(image)
        pixels = [np.asarray(self.render(decoded, box)) for box in self.view_boxes(decoded, index=index, views=views)]
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # [V, 3, H, W]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rescale and normalise 8-bit views as the processor does: ``[..., 3, H, W]`` uint8 -> float32.

        A table look-up with the processor's arithmetic, so the result is the same bits on any device.

        Args:
            pixels: ``[..., 3, H, W]`` uint8 views, on any device.

        Returns:
            ``[..., 3, H, W]`` float32 on the same device.

        Example:
            >>> from transformers import CLIPImageProcessor
            >>> transform = build_eval_transform(CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3))
            >>> transform.normalise(torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 2).expand(3, 1, 2))[0]
            tensor([[-1.,  1.]])
        """
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
    """Whether ``processor`` makes SigLIP 2 NaFlex inputs, whose size depends on the image.

    A NaFlex image processor (``Siglip2ImageProcessor``) resizes each image to the largest grid of
    ``patch_size`` pixels that keeps its aspect ratio within ``max_num_patches`` patches, and returns
    ``pixel_values`` ``[N, max_num_patches, 3 * p * p]``, ``pixel_attention_mask`` and ``spatial_shapes``.
    :func:`build_train_transform` and :func:`build_eval_transform` return a :class:`NaFlexTransform` for it.

    Args:
        processor: An image processor, or a processor holding one (``.image_processor``).

    Returns:
        ``True`` when it has ``patch_size`` and ``max_num_patches`` and makes ``spatial_shapes``.

    Example:
        >>> from transformers import CLIPImageProcessor, Siglip2ImageProcessorPil
        >>> is_naflex_processor(Siglip2ImageProcessorPil()), is_naflex_processor(CLIPImageProcessor())
        (True, False)
    """
    image_processor = getattr(processor, "image_processor", processor)
    return (
        "spatial_shapes" in (getattr(image_processor, "model_input_names", None) or ())
        and getattr(image_processor, "patch_size", None) is not None
        and getattr(image_processor, "max_num_patches", None) is not None
    )


class NaFlexTransform(ImageTransform):
    """SigLIP 2 NaFlex views: the paper's random crop and flip (train views), then the model's own processor.

    A NaFlex processor sizes its output from the image it is given (see :func:`is_naflex_processor`), so
    there is no fixed size to crop to. A train view is therefore a box of the source image, the same
    random box and flip that :func:`build_train_transform` takes for a fixed-size processor with the same
    seed (view ``v`` of image ``i`` is a pure function of ``(seed, i, v)``), cut out at full resolution
    and flipped; the processor then makes the model's inputs from it, resizing it with ``resample``. The
    crop keeps its aspect ratio on the patch grid instead of being stretched to a square. An eval view is
    the processor's output for the whole image. Either way the inputs are the processor's own, computed
    by the processor object itself, so a torchvision-backed processor gives what it gives everywhere.

    Calling the transform returns the model's inputs by name, which feature extraction stacks and passes
    to ``get_image_features``: ``pixel_values`` ``[max_num_patches, 3 * p * p]`` float32,
    ``pixel_attention_mask`` ``[max_num_patches]`` int32 (1 on the image's patches) and ``spatial_shapes``
    ``[2]`` int64 (rows and columns of patches).

    The views are made on the CPU (in the DataLoader workers): the device path of feature extraction
    resamples boxes to one fixed size, which NaFlex does not have. The source is decoded in full (JPEG
    draft decoding does not apply), since the processor picks the output's size from the pixels it gets.

    Args:
        image_processor: A NaFlex image processor, or a processor holding one (``.image_processor``).
        augmentation: The train views' random crop and flip (as :func:`build_train_transform` makes it);
            ``None`` for eval views.
        resample: PIL filter of the processor's resize of a train view; ``None``: the processor's own.

    Raises:
        ValueError: for a processor that does not make NaFlex inputs.

    Example:
        >>> from PIL import Image
        >>> from transformers import Siglip2ImageProcessorPil
        >>> processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
        >>> inputs = build_train_transform(processor, seed=0)(Image.new("RGB", (64, 32)), index=0, view=1)
        >>> {name: tuple(value.shape) for name, value in inputs.items()}
        {'pixel_values': (16, 192), 'pixel_attention_mask': (16,), 'spatial_shapes': (2,)}
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
        """The box of the source that view ``view`` of image ``index`` shows, and whether it is flipped.

        Args:
            width: Source width.
            height: Source height.
            index: The image's row.
            view: The augmentation number.

        Returns:
            ``((left, top, right, bottom), flip)`` in source pixels; the whole image unflipped for eval views.

        Raises:
            ValueError: for a negative or non-integer index or view.

        Example:
            >>> from transformers import Siglip2ImageProcessorPil
            >>> build_eval_transform(Siglip2ImageProcessorPil()).view_crop(64, 32, index=3, view=1)
            ((0, 0, 64, 32), False)
        """
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

    The result equals ``image_processor(images=image).pixel_values[0]`` (to float rounding), written with
    PIL and torch only. A JPEG at least twice the resized size is decoded at reduced scale (``draft``):
    a 12 MP photo for a 224 px model is decoded at 1/8, where the processor would decode all 12 MP and
    resize them; the result differs from the processor's by the difference of the two antialiased
    reductions. For a SigLIP 2 NaFlex processor (:func:`is_naflex_processor`) the transform is the
    processor itself: a :class:`NaFlexTransform` returning its three inputs for the whole image.

    Args:
        image_processor: The model's image processor (``CLIPImageProcessor``, ``SiglipImageProcessor``,
            ``Siglip2ImageProcessor``, ...), or a processor holding one.
        draft: Decode large JPEGs at 1/2, 1/4 or 1/8 scale, never below the resized size. ``False``
            decodes every image in full. (Fixed-size processors only: NaFlex decodes in full.)

    Returns:
        A :class:`ResizedCropTransform` (a :class:`NaFlexTransform` for NaFlex) that ignores ``index`` and
        ``view``.

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

    The crop covers a random ``scale`` share of the image with a random aspect ratio in ``ratio`` (the
    rule of torchvision's ``RandomResizedCrop``), is resampled to the processor's crop size (one PIL
    resize of the crop's box) and flipped with probability ``flip_probability``; then the processor's
    rescale and mean/std normalisation apply. The randomness of ``transform(image, index=i, view=v)``
    comes from ``(seed, i, v)`` alone. With ``draft``, a JPEG so large that even the smallest crop
    ``scale`` and ``ratio`` allow holds twice the output's pixels is decoded at reduced scale (a 12 MP
    photo at 1/2 for 224 px and ``scale[0] = 0.08``).

    For a SigLIP 2 NaFlex processor (:func:`is_naflex_processor`), which has no fixed size to resample the
    crop to, the same box is cut out and flipped, and the processor then makes its three inputs from it,
    resizing with ``resample`` (a :class:`NaFlexTransform`).

    Args:
        image_processor: The model's image processor, or a processor holding one.
        seed: Seed of the augmentations (integer >= 0).
        scale: Range of the crop's share of the image area, ``0 < low <= high <= 1``.
        ratio: Range of the crop's aspect ratio (width / height), ``0 < low <= high``.
        flip_probability: Probability of a horizontal flip, in [0, 1].
        resample: PIL filter of the crop's resize (bicubic, as in the paper).
        draft: Decode large JPEGs at 1/2, 1/4 or 1/8 scale, never below the resolution the smallest crop
            needs. ``False`` decodes every image in full. (Fixed-size processors only: NaFlex decodes in
            full.)

    Returns:
        A :class:`ResizedCropTransform` (a :class:`NaFlexTransform` for NaFlex), deterministic in
        ``(seed, index, view)``.

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
