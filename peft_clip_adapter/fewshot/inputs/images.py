"""Reading images as 8-bit RGB, whatever form a ``datasets`` image column gives them in.

Grayscale, palette, CMYK, 16-bit and transparent images become RGB as CLIP's processor makes them
(transparency on white), and an unreadable file is named. ``load_image_draft`` lets libjpeg decode a large
JPEG at 1/2, 1/4 or 1/8 scale when fewer pixels will do: a 12 MP photo then costs a fraction of its decode.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

__all__ = ["DecodedImage", "load_image", "load_image_draft", "to_rgb"]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: The reductions libjpeg's DCT scaling offers in PIL's draft mode, largest first.
_DRAFT_SCALES = (8, 4, 2)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, the way CLIP's image processor converts it.

    Transparency is composited on white, 16-bit scaled (not clipped), float read as [0, 1] when it fits.
    Raises ``ValueError`` naming a mode PIL cannot convert.
    """
    if image.mode == "RGB":
        return image
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image), image.mode), mode="L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # [H, W, 4]
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert an image of mode {image.mode!r} to RGB: {error}") from error


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grayscale ``[H, W]`` from a 16-bit, 32-bit integer or float grayscale array."""
    values = array.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 65535 -> 255
    elif mode == "F" and values.max(initial=0) <= 1.0:
        values = values * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


class DecodedImage(NamedTuple):
    """An image read by ``load_image_draft``: RGB pixels decoded at ``scale`` (1, 2, 4 or 8) and the full ``size``.

    Pixel ``(x, y)`` of ``image`` covers source pixels ``[x * scale, (x + 1) * scale)``; ``size`` is
    ``(width, height)`` at full size.
    """

    image: Image.Image
    scale: int
    size: tuple[int, int]


def _source(value: Any) -> tuple[Any, str]:
    """What ``Image.open`` reads for ``value`` (a path or a buffer) and the name errors give it."""
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        if data is None and path is None:
            raise ValueError("An image value {'path': None, 'bytes': None} holds no image.")
        return (io.BytesIO(data), path or f"<{len(data)} bytes>") if data is not None else (path, path)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), os.fspath(value)
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value), f"<{len(value)} bytes>"
    raise ValueError(
        f"Cannot read an image from a {type(value).__name__}; expected a PIL image, a "
        "{'path', 'bytes'} dict, a file path or encoded bytes."
    )


def load_image_draft(value: Any, max_scale: Callable[[int, int], float] | None = None) -> DecodedImage:
    """``load_image``, but a JPEG decoded at the largest of 1/8, 1/4, 1/2 scale up to ``max_scale(width, height)``.

    ``max_scale`` gets the full size from the header before any pixel is decoded; ``None`` (and other formats,
    and PIL images) decode at full size. libjpeg's DCT scaling is itself an antialiased reduction.
    """
    if isinstance(value, Image.Image):
        return DecodedImage(to_rgb(value), 1, value.size)
    source, name = _source(value)
    try:
        image = Image.open(source)
        size, scale = image.size, 1
        if max_scale is not None and image.format in ("JPEG", "MPO"):
            limit = max_scale(*size)
            wanted = next((s for s in _DRAFT_SCALES if s <= limit), 1)
            if wanted > 1:
                # PIL picks the largest DCT scale with at least the requested size; it reports the box of the
                # full image in decoded pixels, from which the scale it chose follows exactly.
                drafted = image.draft(image.mode, (size[0] // wanted, size[1] // wanted))
                if drafted is not None:
                    scale = round(size[0] / drafted[1][2])
        image.load()  # decode now, so a truncated file fails here rather than inside a transform
        rgb = to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image file {name!r}: {error}") from error
    if rgb is image:  # already RGB: copy, so that closing the file keeps the pixels
        rgb = image.copy()
    image.close()
    return DecodedImage(rgb, scale, size)


def load_image(value: Any) -> Image.Image:
    """One image as a fully decoded RGB PIL image, whatever form a ``datasets`` column gives it in.

    A PIL image, a ``{"path", "bytes"}`` dict (bytes first), a path or encoded bytes. Raises ``ValueError``
    naming a file that cannot be read, or for a value of another type.
    """
    return load_image_draft(value).image
