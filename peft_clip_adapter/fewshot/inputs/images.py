"""Reading images as RGB, whatever form a ``datasets`` image column gives them in.

CLIP sees 8-bit RGB. Datasets hold grayscale, palette, CMYK, 16-bit and transparent images too, and an
``Image(decode=False)`` column gives ``{"path", "bytes"}`` dicts; :func:`load_image` turns any of them into
RGB the way CLIP's image processor does (transparency composited on white), and names the file when it
cannot be read. :func:`load_image_draft` does the same but lets libjpeg decode a large JPEG at 1/2, 1/4
or 1/8 scale (PIL's draft mode) when the caller needs fewer pixels: a 12 MP photo then costs a fraction of
its full decode.
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
    """Convert any PIL image to 8-bit RGB, the way CLIP's image processor does.

    Transparent images (RGBA, LA, PA, or a palette with a transparent colour) are composited on white;
    16-bit grayscale is scaled to 8 bits instead of being clipped; float (``F``) images are read as [0, 1]
    when they fit, else as [0, 255]. An RGB image is returned as is.

    Args:
        image: A PIL image of any mode.

    Returns:
        An RGB image of the same size.

    Raises:
        ValueError: for a mode PIL cannot convert to RGB, naming it.

    Example:
        >>> from PIL import Image
        >>> to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0))  # fully transparent -> white
        (255, 255, 255)
        >>> to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0))
        (7, 7, 7)
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
    """An image read by :func:`load_image_draft`: the RGB pixels and the scale they were decoded at.

    Attributes:
        image: The RGB image, ``ceil(width / scale) x ceil(height / scale)`` pixels.
        scale: 1 (full size), 2, 4 or 8: pixel ``(x, y)`` of ``image`` covers the source pixels
            ``[x * scale, (x + 1) * scale)`` horizontally and likewise vertically.
        size: ``(width, height)`` of the source image at full size.

    Example:
        >>> from PIL import Image
        >>> decoded = DecodedImage(Image.new("RGB", (4, 3)), 1, (4, 3))
        >>> decoded.scale, decoded.size
        (1, (4, 3))
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
    """Read one image like :func:`load_image`, decoding a JPEG at reduced scale where the caller allows it.

    ``max_scale(width, height)`` gets the full size from the file's header, before any pixel is decoded,
    and returns the largest reduction the caller can use (for instance, how many times larger than the
    output the smallest crop of the image is). A JPEG is then decoded at the largest of 1/8, 1/4 or 1/2
    scale that does not exceed it, through libjpeg's DCT scaling, which costs a fraction of a full decode
    and is itself an antialiased reduction. Other formats, and images given as PIL images, come at full
    size.

    Args:
        value: Anything :func:`load_image` reads.
        max_scale: ``(width, height) -> float``; ``None`` decodes at full size.

    Returns:
        A :class:`DecodedImage`: the RGB image, the scale used (1, 2, 4 or 8) and the full size.

    Raises:
        ValueError: as :func:`load_image`, naming the file.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (800, 600), "red").save(buffer, format="JPEG")
        >>> decoded = load_image_draft(buffer.getvalue(), lambda width, height: height / 224)
        >>> decoded.image.size, decoded.scale, decoded.size
        ((400, 300), 2, (800, 600))
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
    """Read one image, whatever form a ``datasets`` image column gives it in, as an RGB PIL image.

    Args:
        value: A PIL image (a decoded ``Image`` column), a ``{"path", "bytes"}`` dict (an ``Image(decode=False)``
            column; the bytes are used when present, else the file), a file path, or raw encoded bytes.

    Returns:
        The image in RGB (see :func:`to_rgb`), fully decoded.

    Raises:
        ValueError: for a file or bytes that cannot be read as an image, naming the file, or for a value of
            another type.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buffer = io.BytesIO()
        >>> Image.new("P", (3, 2)).save(buffer, format="PNG")
        >>> image = load_image({"path": "tiny.png", "bytes": buffer.getvalue()})
        >>> image.mode, image.size
        ('RGB', (3, 2))
    """
    return load_image_draft(value).image
