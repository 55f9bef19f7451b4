"""Reading images as RGB, whatever form a ``datasets`` image column gives them in.

CLIP sees 8-bit RGB. Datasets hold grayscale, palette, CMYK, 16-bit and transparent images too, and an
``Image(decode=False)`` column gives ``{"path", "bytes"}`` dicts; :func:`load_image` turns any of them into
RGB the way CLIP's image processor does (transparency composited on white), and names the file when it
cannot be read.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["load_image", "to_rgb"]

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


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
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        if data is None and path is None:
            raise ValueError("An image value {'path': None, 'bytes': None} holds no image.")
        source, name = (io.BytesIO(data), path or f"<{len(data)} bytes>") if data is not None else (path, path)
    elif isinstance(value, (str, os.PathLike)):
        source = name = os.fspath(value)
    elif isinstance(value, (bytes, bytearray)):
        source, name = io.BytesIO(value), f"<{len(value)} bytes>"
    else:
        raise ValueError(
            f"Cannot read an image from a {type(value).__name__}; expected a PIL image, a "
            "{'path', 'bytes'} dict, a file path or encoded bytes."
        )
    try:
        image = Image.open(source)
        image.load()  # decode now, so a truncated file fails here rather than inside a transform
        rgb = to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image file {name!r}: {error}") from error
    if rgb is image:  # already RGB: copy, so that closing the file keeps the pixels
        rgb = image.copy()
    image.close()
    return rgb
