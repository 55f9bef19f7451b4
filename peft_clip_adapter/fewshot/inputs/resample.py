"""Views made on the accelerator: PIL's antialiased resize of many boxes as two batched matrix products.

Feature extraction can decode each image once on the CPU, ship the 8-bit pixels to the GPU, and make
every view there (:func:`render_views`): the CPU then spends about ``decode / V`` per view instead of a
PIL resize per view. A resize with a box is separable: along each axis, output pixel ``j`` is a weighted
sum of the source pixels around its centre, with PIL's filter stretched by the downscale factor
(antialiasing) and normalised. :func:`axis_weights` builds those weights exactly as PIL's
``precompute_coeffs`` does (same centres, support, truncation and 22-bit fixed-point coefficients), so a
view is ``Wy @ image @ Wx^T`` per channel, horizontal pass first and rounded to 8 bits after each pass.
Where PIL runs its two passes in that order too, the result is PIL's except where float32 accumulation
lands on the other side of a rounding tie (about 1 pixel in 10^5, by one level); recent Pillow releases
sometimes run the vertical pass first, and the intermediate rounding then differs: photographs stay
within one level, pure pixel noise within a few. Flips reverse the rows of ``Wx``; windows past the
resized image (an eval crop larger than the image) get zero rows, which is PIL's black padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from peft_clip_adapter.fewshot.inputs.transforms import ViewBox

__all__ = ["ViewBatch", "axis_weights", "render_views", "supports_filter"]

#: PIL's fixed-point precision of 8-bit resampling coefficients (Resample.c: 32 - 8 - 2 bits).
_PRECISION_BITS = 22
#: Support (half-width at scale 1) of each PIL filter the device path reproduces.
_SUPPORT = {
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}
#: Intermediate tensors of one rendering step are kept under this many bytes (images are split to fit).
_CHUNK_BYTES = 1 << 28


def supports_filter(resample: int) -> bool:
    """Whether :func:`render_views` reproduces PIL filter ``resample`` (all but the MKS kernels).

    Args:
        resample: A PIL ``Image.Resampling`` value.

    Returns:
        ``True`` for nearest, box, bilinear, Hamming, bicubic and Lanczos.

    Example:
        >>> supports_filter(Image.Resampling.BICUBIC), supports_filter(Image.Resampling.BICUBIC + 100)
        (True, False)
    """
    return int(resample) in _SUPPORT or int(resample) == Image.Resampling.NEAREST


def _filter(x: torch.Tensor, resample: int) -> torch.Tensor:
    """PIL's filter functions (Resample.c), in float64, including its single-precision Hamming constants."""
    if resample == Image.Resampling.BOX:
        return ((x > -0.5) & (x <= 0.5)).to(x.dtype)
    x = x.abs()
    if resample == Image.Resampling.BILINEAR:
        return (1.0 - x).clamp(min=0.0)
    if resample == Image.Resampling.BICUBIC:
        a = -0.5
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))
    radians = x * math.pi
    sinc = torch.where(x == 0.0, torch.ones_like(x), torch.sin(radians) / radians)
    if resample == Image.Resampling.HAMMING:
        window = float(np.float32(0.54)) + float(np.float32(0.46)) * torch.cos(radians)
        return torch.where(x >= 1.0, torch.zeros_like(x), sinc * window)
    third = x / 3 * math.pi
    sinc_third = torch.where(x == 0.0, torch.ones_like(x), torch.sin(third) / third)
    return torch.where(x < 3.0, sinc * sinc_third, torch.zeros_like(x))  # Lanczos, a = 3


def axis_weights(
    in_size: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    resized: torch.Tensor,
    offset: torch.Tensor,
    flip: torch.Tensor,
    *,
    out_size: int,
    in_max: int,
    resample: int,
) -> torch.Tensor:
    """Resampling weights along one axis for ``N`` views: ``[N, out_size, in_max]`` float32.

    Row ``j`` of view ``n`` holds PIL's coefficients for output pixel ``j + offset[n]`` of the source
    interval ``[start[n], end[n])`` resampled to ``resized[n]`` pixels; rows outside ``[0, resized[n])``
    are zero (black padding), rows are reversed where ``flip[n]``, and columns at or past ``in_size[n]``
    are zero (padding of a batch of images of several sizes).

    Args:
        in_size: ``[N]`` source length (pixels) of each view's image.
        start: ``[N]`` start of the box along this axis (source pixels, float).
        end: ``[N]`` end of the box.
        resized: ``[N]`` length the box is resampled to.
        offset: ``[N]`` first resampled pixel of the output window.
        flip: ``[N]`` bool: reverse the output.
        out_size: Length of the output window.
        in_max: Columns of the result (the padded source length).
        resample: A PIL filter (see :func:`supports_filter`).

    Returns:
        ``[N, out_size, in_max]`` float32 weights on ``start``'s device; each non-zero row sums to 1 (to
        PIL's 22-bit coefficient precision).

    Raises:
        ValueError: for a filter :func:`supports_filter` refuses.

    Example:
        >>> one = torch.ones(1)
        >>> weights = axis_weights(torch.tensor([4]), 0 * one, 4 * one, torch.tensor([2]), torch.tensor([0]),
        ...     torch.tensor([False]), out_size=2, in_max=4, resample=Image.Resampling.BOX)
        >>> weights[0]
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    if not supports_filter(resample):
        raise ValueError(f"resample={resample} has no device implementation; make these views on the CPU.")
    device = start.device
    float64 = dict(dtype=torch.float64, device=device)
    # PIL passes the box as C floats and computes the box length in single precision.
    start32, end32 = start.to(torch.float32), end.to(torch.float32)
    start64 = start32.to(torch.float64)[:, None]  # [N, 1]
    scale = (end32 - start32).to(torch.float64)[:, None] / resized.to(**float64)[:, None]  # [N, 1]
    pixel = torch.arange(out_size, device=device)[None, :] + offset.to(device)[:, None]  # [N, out]
    inside = (pixel >= 0) & (pixel < resized.to(device)[:, None])  # [N, out]
    center = start64 + (pixel.to(torch.float64) + 0.5) * scale  # [N, out]
    source = torch.arange(in_max, **float64)[None, None, :]  # [1, 1, in]
    sizes = in_size.to(**float64)[:, None, None]  # [N, 1, 1]
    if int(resample) == Image.Resampling.NEAREST:
        # PIL's nearest resize takes the source pixel under each output pixel's centre, found by adding the
        # step to a running position (ImagingScaleAffine): repeat that sum, in order, to pick the same pixels.
        steps = int(pixel.max().clamp(min=0)) + 1
        running = (start64[:, 0] + scale[:, 0] * 0.5).cpu().numpy()  # [N]
        step = scale[:, 0].cpu().numpy()  # [N]
        positions = np.empty((len(running), steps))  # [N, steps]
        for column in range(steps):
            positions[:, column] = running
            running = running + step
        at = pixel.clamp(0, steps - 1).cpu().numpy()  # [N, out]
        center = torch.from_numpy(np.take_along_axis(positions, at, axis=1)).to(device)  # [N, out]
        chosen = torch.trunc(center.clamp(min=0))[..., None].minimum(sizes - 1)  # [N, out, 1]
        weights = (source == chosen).to(torch.float64)
    else:
        filter_scale = scale.clamp(min=1.0)[..., None]  # [N, 1, 1]
        support = _SUPPORT[int(resample)] * filter_scale
        center = center[..., None]  # [N, out, 1]
        low = torch.trunc(center - support + 0.5).clamp(min=0)  # C's (int) truncates toward zero
        high = torch.minimum(torch.trunc(center + support + 0.5), sizes)
        taps = (source >= low) & (source < high)  # [N, out, in]
        weights = _filter((source - center + 0.5) * (1.0 / filter_scale), int(resample)) * taps
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total != 0, weights / torch.where(total != 0, total, 1.0), weights)
        # PIL's 8-bit coefficients: round half away from zero to 22 fractional bits.
        unit = float(1 << _PRECISION_BITS)
        weights = torch.trunc(weights * unit + torch.where(weights < 0, -0.5, 0.5)) / unit
    weights = weights * inside[..., None]
    weights = torch.where(flip.to(device)[:, None, None], weights.flip(1), weights)
    return weights.to(torch.float32)  # [N, out, in]


@dataclass
class ViewBatch:
    """Decoded 8-bit images and the boxes of their views, as tensors: what the accelerator needs.

    Made in DataLoader workers by :meth:`collate`, pinned and copied to the device as a whole.

    Args:
        images: ``[k, 3, H_max, W_max]`` uint8, zero-padded at the bottom and right.
        sizes: ``[k, 2]`` int64 ``(height, width)`` of each decoded image.
        boxes: ``[k, V, 4]`` float64 ``(left, top, right, bottom)`` in decoded pixels.
        resized: ``[k, V, 2]`` int64 ``(height, width)`` each box is resampled to.
        offsets: ``[k, V, 2]`` int64 ``(top, left)`` of the output window.
        flips: ``[k, V]`` bool.

    Example:
        >>> from peft_clip_adapter.fewshot.inputs.transforms import ViewBox
        >>> image = torch.zeros(3, 4, 6, dtype=torch.uint8)
        >>> batch = ViewBatch.collate([image], [[ViewBox((0.0, 0.0, 6.0, 4.0), (2, 3), (0, 0), False)]])
        >>> tuple(batch.images.shape), batch.sizes.tolist(), tuple(batch.boxes.shape)
        ((1, 3, 4, 6), [[4, 6]], (1, 1, 4))
    """

    images: torch.Tensor
    sizes: torch.Tensor
    boxes: torch.Tensor
    resized: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor

    @classmethod
    def collate(cls, images: list[torch.Tensor], boxes: list[list[ViewBox]]) -> ViewBatch:
        """Pad ``images`` (each ``[3, h, w]`` uint8) into one tensor and tabulate their views' boxes.

        Args:
            images: One decoded image per row.
            boxes: Per row, its views' ``ViewBox`` es (decoded pixels).

        Returns:
            The batch, on the CPU.

        Example:
            See the class example.
        """
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        padded = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
        for row, image in enumerate(images):
            padded[row, :, : image.shape[1], : image.shape[2]] = image
        return cls(
            images=padded,
            sizes=torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.int64),
            boxes=torch.tensor([[list(view.box) for view in row] for row in boxes], dtype=torch.float64),
            resized=torch.tensor([[list(view.resized) for view in row] for row in boxes], dtype=torch.int64),
            offsets=torch.tensor([[list(view.offset) for view in row] for row in boxes], dtype=torch.int64),
            flips=torch.tensor([[view.flip for view in row] for row in boxes], dtype=torch.bool),
        )

    def pin_memory(self) -> ViewBatch:
        """The batch in page-locked memory (the DataLoader calls this with ``pin_memory=True``).

        Returns:
            A pinned copy.

        Example:
            On a machine with a GPU (pinning needs one), ``batch.pin_memory().to("cuda", non_blocking=True)``
            copies the batch while the host goes on.
        """
        return ViewBatch(**{field.name: getattr(self, field.name).pin_memory() for field in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        """The batch on ``device`` (asynchronously from pinned memory with ``non_blocking``).

        Args:
            device: Target device.
            non_blocking: Passed to ``Tensor.to``.

        Returns:
            The moved batch.

        Example:
            >>> image = torch.zeros(3, 2, 2, dtype=torch.uint8)
            >>> ViewBatch.collate([image], [[]]).to("cpu").images.device
            device(type='cpu')
        """
        return ViewBatch(
            **{field.name: getattr(self, field.name).to(device, non_blocking=non_blocking) for field in fields(self)}
        )


def _round_to_8_bits(values: torch.Tensor) -> torch.Tensor:
    # PIL: (2^21 + sum of 22-bit coefficients x pixels) >> 22, clipped to [0, 255].
    return values.add_(0.5).floor_().clamp_(0, 255)


def render_views(batch: ViewBatch, *, output_size: tuple[int, int], resample: int) -> torch.Tensor:
    """Every view of every image in ``batch``, as PIL would make them: ``[V, k, 3, H, W]`` uint8.

    Runs where ``batch`` is (a GPU, or the CPU): per chunk of images, one batched product per axis,
    horizontal first and rounded to 8 bits after each pass, as PIL's two-pass resize.

    Args:
        batch: Images and boxes (from :meth:`ViewBatch.collate`, moved to the device).
        output_size: ``(H, W)`` of every view.
        resample: A PIL filter (see :func:`supports_filter`).

    Returns:
        ``[V, k, 3, H, W]`` uint8 on ``batch``'s device.

    Raises:
        ValueError: for a filter :func:`supports_filter` refuses.

    Example:
        >>> from peft_clip_adapter.fewshot.inputs.transforms import ViewBox
        >>> image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4).expand(3, 4, 4).contiguous()
        >>> views = [ViewBox((0.0, 0.0, 4.0, 4.0), (2, 2), (0, 0), False),
        ...          ViewBox((0.0, 0.0, 4.0, 4.0), (2, 2), (0, 0), True)]
        >>> pixels = render_views(ViewBatch.collate([image], [views]), output_size=(2, 2),
        ...                       resample=Image.Resampling.BOX)
        >>> pixels[:, 0, 0].tolist()  # 2 x 2 means of the 4 x 4 ramp, then the same mirrored
        [[[3, 5], [11, 13]], [[5, 3], [13, 11]]]
    """
    height, width = output_size
    count, views = batch.boxes.shape[:2]
    in_height, in_width = batch.images.shape[2:]
    sizes = batch.sizes.repeat_interleave(views, dim=0)  # [k*V, 2]
    boxes = batch.boxes.reshape(-1, 4)  # [k*V, 4]
    resized, offsets = batch.resized.reshape(-1, 2), batch.offsets.reshape(-1, 2)  # [k*V, 2] each
    flips = batch.flips.reshape(-1)  # [k*V]
    across = axis_weights(
        sizes[:, 1],
        boxes[:, 0],
        boxes[:, 2],
        resized[:, 1],
        offsets[:, 1],
        flips,
        out_size=width,
        in_max=in_width,
        resample=resample,
    )  # [k*V, W, W_in]
    down = axis_weights(
        sizes[:, 0],
        boxes[:, 1],
        boxes[:, 3],
        resized[:, 0],
        offsets[:, 0],
        torch.zeros_like(flips),
        out_size=height,
        in_max=in_height,
        resample=resample,
    )  # [k*V, H, H_in]
    # All views of an image in one product per pass: [3*H_in, W_in] @ [W_in, V*W], then [H, H_in] @ [H_in, 3*W].
    across = across.reshape(count, views * width, in_width).transpose(1, 2)  # [k, W_in, V*W]
    down = down.reshape(count, views, height, in_height)  # [k, V, H, H_in]
    per_image = 4 * 3 * in_height * (in_width + 2 * views * width)  # bytes of one image's float intermediates
    step = max(1, _CHUNK_BYTES // per_image)
    chunks: list[torch.Tensor] = []
    for first in range(0, count, step):
        images = batch.images[first : first + step].to(torch.float32)  # [c, 3, H_in, W_in]
        chunk = images.shape[0]
        rows = _round_to_8_bits(images.reshape(chunk, 3 * in_height, in_width) @ across[first : first + step])
        rows = rows.reshape(chunk, 3, in_height, views, width).permute(0, 3, 2, 1, 4)  # [c, V, H_in, 3, W]
        rows = rows.reshape(chunk, views, in_height, 3 * width)
        pixels = _round_to_8_bits(down[first : first + step] @ rows)  # [c, V, H, 3*W]
        pixels = pixels.reshape(chunk, views, height, 3, width).permute(1, 0, 3, 2, 4)  # [V, c, 3, H, W]
        chunks.append(pixels.to(torch.uint8))
    return torch.cat(chunks, dim=1)  # [V, k, 3, H, W]
