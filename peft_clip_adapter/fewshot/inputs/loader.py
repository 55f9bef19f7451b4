"""Feature extraction's input pipeline: DataLoader workers decode each image once and make all its views.

Decoding in the main process between forward passes leaves a GPU idle, so workers read chunks of a batch
ahead of the backbone (pinned memory on CUDA). Rows are cut into fixed batches by index and processes take
whole batches, so the backbone sees the same inputs, and the features are bitwise identical, for any number
of workers and processes. With the library's fixed-size transforms the views can be made on the accelerator
(the worker only decodes; ``resample.render_views`` makes the same boxes); NaFlex views are always made by
the processor in the workers. A worker's ``ValueError`` reaches the caller with its own message (naming the
unreadable file), and a dead worker is reported as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from peft_clip_adapter.fewshot.embeddings import frozen_image_embeddings, unwrap_model
from peft_clip_adapter.fewshot.inputs.images import load_image
from peft_clip_adapter.fewshot.inputs.resample import ViewBatch, render_views, supports_filter
from peft_clip_adapter.fewshot.inputs.transforms import (
    NaFlexTransform,
    ResizedCropTransform,
    move_model_inputs,
    stack_model_inputs,
)
from peft_clip_adapter.fewshot.logs import progress as progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "AUTOCAST_DTYPES",
    "ExtractionSettings",
    "cores_per_process",
    "default_num_workers",
    "device_views_possible",
    "encode_views",
    "resolve_extraction",
    "row_batches",
    "split_batches",
]

#: Accelerate's ``mixed_precision`` values and the dtype extraction autocasts to (fp8, as Accelerate does
#: for the operations it does not run in fp8, autocasts to bf16).
AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {
    "no": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,
}
#: Dtypes a feature cache may store.
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Rows per DataLoader item: small enough to spread a batch over the workers and to keep few megabytes in
#: flight, fixed (never derived from the worker count) so that the work done per item never depends on it.
CHUNK_ROWS = 8
#: Workers at most by default: beyond this, decoding outruns any single backbone.
MAX_DEFAULT_WORKERS = 8
#: Chunks a worker should have to read before the default starts one (its start-up then pays off).
CHUNKS_PER_WORKER = 4
#: With the backbone on the CPU, cores per default worker (the rest run the backbone's threads).
CPU_CORES_PER_WORKER = 8


def cores_per_process() -> int:
    """CPU cores this process may use: its affinity mask shared among ``LOCAL_WORLD_SIZE`` processes (>= 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_num_workers(num_chunks: Optional[int] = None, device: Union[str, torch.device] = "cuda") -> int:
    """DataLoader workers per process by default.

    Feeding an accelerator, decoding is the bottleneck: one per core, 1 to 8. With a CPU backbone, which needs
    the cores for its threads and spends tens of milliseconds per view against decoding's few: one per
    ``CPU_CORES_PER_WORKER`` cores. Given ``num_chunks``, each worker gets at least ``CHUNKS_PER_WORKER`` chunks,
    since starting one costs about 0.1 s.
    """
    cores = cores_per_process()
    if torch.device(device).type == "cpu":
        workers = cores // CPU_CORES_PER_WORKER
    else:
        workers = max(1, min(MAX_DEFAULT_WORKERS, cores))
    return workers if num_chunks is None else min(workers, num_chunks // CHUNKS_PER_WORKER)


def row_batches(num_rows: int, batch_size: int) -> list[list[int]]:
    """The fixed batches of extraction: batch ``b`` holds rows ``[b * batch_size, (b + 1) * batch_size)``.

    Example:
        >>> row_batches(5, 2)
        [[0, 1], [2, 3], [4]]
    """
    return [list(range(start, min(start + batch_size, num_rows))) for start in range(0, num_rows, batch_size)]


def split_batches(batches: list[list[int]], accelerator=None) -> list[list[int]]:
    """This process's share of ``batches``: whole batches, contiguous, as Accelerate splits a list (maybe none)."""
    if accelerator is None or accelerator.num_processes == 1:
        return batches
    with accelerator.split_between_processes(list(range(len(batches)))) as mine:
        return [batches[index] for index in mine]


@dataclass(frozen=True)
class ExtractionSettings:
    """How extraction runs: what changes the features (enters the cache key), and the worker count (which does not).

    ``mixed_precision`` is the backbone's autocast (Accelerate's names); ``num_workers`` -1 lets the loader pick.
    """

    views_on_device: bool
    mixed_precision: str
    features_dtype: torch.dtype
    num_workers: int

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype the backbone autocasts to (fp8 autocasts to bf16), or ``None``."""
        return AUTOCAST_DTYPES[self.mixed_precision]

    def key_components(self) -> dict[str, str]:
        """``{"views_made_on", "autocast", "features_dtype"}``: what of these settings enters a feature-cache key."""
        autocast = self.autocast_dtype
        return {
            "views_made_on": "device" if self.views_on_device else "cpu",
            "autocast": "no" if autocast is None else str(autocast).removeprefix("torch."),
            "features_dtype": str(self.features_dtype).removeprefix("torch."),
        }


def _check_num_workers(num_workers: Any) -> None:
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ValueError(
            f"num_workers={num_workers!r} must be an integer >= 0 (0 decodes in the main process) or None "
            "(a default for the device and the number of images)."
        )


def device_views_possible(transform: Any) -> bool:
    """Whether ``render_views`` can make ``transform``'s views (a fixed-size ``ResizedCropTransform``)."""
    return (
        isinstance(transform, ResizedCropTransform)
        and transform.output_size is not None
        and supports_filter(transform.resample)
    )


def resolve_extraction(
    transform: Any,
    device: torch.device,
    *,
    num_workers: Optional[int] = None,
    views_on_device: Optional[bool] = None,
    mixed_precision: Optional[str] = None,
    features_dtype: torch.dtype = torch.float32,
    accelerator=None,
) -> ExtractionSettings:
    """Check the extraction options and fill in their defaults for this transform, device and accelerator.

    ``views_on_device=None`` means on the device when it is an accelerator and the transform allows it; ``True``
    with a NaFlex transform warns and stays on the CPU. ``mixed_precision=None`` takes the accelerator's. Raises
    ``ValueError`` for a bad ``num_workers``, an unknown ``mixed_precision`` or ``features_dtype``, or
    ``views_on_device=True`` with a transform whose views the device cannot make.
    """
    _check_num_workers(num_workers)
    if mixed_precision is None:
        mixed_precision = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} must be one of {list(AUTOCAST_DTYPES)} (Accelerate's names)."
        )
    if features_dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"features_dtype={features_dtype!r} must be one of {[str(d) for d in FEATURE_DTYPES]}; the cache "
            "stores float32 unless asked for half the size."
        )
    possible = device_views_possible(transform)
    if views_on_device and isinstance(transform, NaFlexTransform):
        # A NaFlex view is the processor's own output for a crop, at a patch grid that depends on the crop;
        # the device path resamples boxes to one fixed size in our own arithmetic, so it cannot make them.
        # The CPU path gives the same features (and the same cache key) as if views_on_device were False.
        logger.warning(
            "views_on_device=True: SigLIP 2 NaFlex views are made by the model's image processor, on the CPU "
            "(in the DataLoader workers); the device path needs a fixed output size. Making them on the CPU."
        )
        views_on_device = False
    if views_on_device and not possible:
        raise ValueError(
            f"views_on_device=True needs a transform whose views the device can make: {transform!r} is not one. "
            "Use build_train_transform / build_eval_transform (a fixed output size and a PIL filter other than "
            "the MKS kernels), or views_on_device=False."
        )
    if views_on_device is None:
        views_on_device = possible and device.type != "cpu"
    return ExtractionSettings(
        views_on_device=bool(views_on_device),
        mixed_precision=mixed_precision,
        features_dtype=features_dtype,
        num_workers=-1 if num_workers is None else num_workers,
    )


# ------------------------------------------------------------------------------------------------------------
# What the workers do


@dataclass
class _Failure:
    """A ``ValueError`` raised in a worker, passed back as data so the caller sees its own message."""

    message: str


@dataclass
class _Chunk:
    """Up to ``CHUNK_ROWS`` rows of one batch: their views (``[V, k, ...]`` per model input) or decoded images."""

    rows: list[int]
    views: Optional[dict[str, torch.Tensor]] = None
    images: Optional[ViewBatch] = None

    def pin_memory(self) -> _Chunk:
        views = None if self.views is None else {key: value.pin_memory() for key, value in self.views.items()}
        return _Chunk(self.rows, views, None if self.images is None else self.images.pin_memory())


class _Rows(Dataset):
    """Item ``row``: that image, decoded once, with all its views (or, for device views, the decoded image)."""

    def __init__(
        self,
        images: datasets.Dataset,
        image_column: str,
        transform: Any,
        *,
        views: int,
        views_on_device: bool,
    ) -> None:
        self.images, self.image_column, self.transform = images, image_column, transform
        self.views, self.views_on_device = range(views), views_on_device

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> Union[tuple[int, Any], _Failure]:
        try:
            value = self.images[row][self.image_column]
            transform = self.transform
            if self.views_on_device:
                decoded = transform.decode(value)
                pixels = torch.from_numpy(np.array(decoded.image)).permute(2, 0, 1).contiguous()  # [3, h, w]
                return row, (pixels, transform.view_boxes(decoded, index=row, views=self.views))
            if isinstance(transform, ResizedCropTransform):
                return row, {"pixel_values": transform.crops(value, index=row, views=self.views)}  # [V, 3, H, W] uint8
            image = load_image(value)
            # [V, ...] per model input: pixel_values [V, 3, H, W], or a NaFlex processor's three inputs.
            return row, stack_model_inputs([transform(image, index=row, view=view) for view in self.views])
        except ValueError as error:
            return _Failure(str(error))


def _collate(items: list[Union[tuple[int, Any], _Failure]]) -> Union[_Chunk, _Failure]:
    failure = next((item for item in items if isinstance(item, _Failure)), None)
    if failure is not None:
        return failure
    rows = [row for row, _ in items]
    payloads = [payload for _, payload in items]
    if isinstance(payloads[0], tuple):  # device views: decoded images and their boxes
        return _Chunk(rows, images=ViewBatch.collate([image for image, _ in payloads], [box for _, box in payloads]))
    return _Chunk(rows, views={key: torch.stack([p[key] for p in payloads], dim=1) for key in payloads[0]})


# ------------------------------------------------------------------------------------------------------------
# The main process


@contextlib.contextmanager
def _worker_faults() -> Iterator[None]:
    """Turn DataLoader's own messages about a dead worker into one that says what it means here."""
    try:
        yield
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        raise RuntimeError(
            f"A DataLoader worker decoding images for feature extraction died ({error}); no features were cached. "
            "If it ran out of memory, lower num_workers (--dataloader_num_workers) or the batch size; "
            "num_workers=0 decodes in the main process."
        ) from error


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in unwrap_model(model).parameters() if p.is_floating_point()), torch.float32)


def encode_views(
    model: nn.Module,
    images: datasets.Dataset,
    batches: Sequence[Sequence[int]],
    transform: Any,
    *,
    views: int,
    image_column: str,
    device: torch.device,
    settings: ExtractionSettings,
    width: int,
    progress: bool = False,
) -> torch.Tensor:
    """Frozen embeddings ``[V, rows, D]`` of every view of the rows of ``batches``, on the CPU.

    In ``settings.features_dtype``; ``images`` has its image column undecoded; row ``i`` of the result is the
    ``i``-th row of the concatenated batches. Raises the first ``ValueError`` a worker met, in row order, or
    ``RuntimeError`` if a worker died.
    """
    chunks = [
        list(batch[start : start + CHUNK_ROWS]) for batch in batches for start in range(0, len(batch), CHUNK_ROWS)
    ]
    workers = settings.num_workers if settings.num_workers >= 0 else default_num_workers(len(chunks), device)
    logger.info(
        "Extracting %d view(s) of %d images with %d DataLoader worker(s); views made on the %s, autocast %s",
        views,
        sum(len(batch) for batch in batches),
        workers,
        "device" if settings.views_on_device else "CPU",
        settings.mixed_precision,
    )
    dataset = _Rows(images, image_column, transform, views=views, views_on_device=settings.views_on_device)
    # Each worker may run this many chunks ahead: together a whole batch and then some, so that they go on
    # decoding the next batch while the backbone runs this one (with a CPU backbone, the main process
    # takes no chunk while it computes).
    chunks_per_batch = -(-max(len(batch) for batch in batches) // CHUNK_ROWS) if batches else 1
    loader = DataLoader(
        dataset,
        batch_sampler=chunks,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=max(2, -(-chunks_per_batch // workers) + 1) if workers else None,
    )
    total = sum(len(batch) for batch in batches)
    features = torch.empty(views, total, width, dtype=settings.features_dtype, device=device)  # [V, n, D]
    model_dtype = _model_dtype(model)
    autocast = settings.autocast_dtype
    pending: list[dict[str, torch.Tensor]] = []  # the current batch's chunks, on the device
    filled, batch_index, done = 0, 0, 0
    bar = progress_bar(total=len(batches), desc="Extracting features", enabled=progress, unit="batches")
    iterator = iter(loader)
    try:
        with _worker_faults():
            for chunk in iterator:
                if isinstance(chunk, _Failure):
                    raise ValueError(chunk.message)
                pending.append(_on_device(chunk, transform, device))
                filled += len(chunk.rows)
                if filled < len(batches[batch_index]):
                    continue
                inputs = {key: torch.cat([part[key] for part in pending], dim=1) for key in pending[0]}  # [V, B, ...]
                for view in range(views):
                    view_inputs = {key: value[view] for key, value in inputs.items()}
                    # The library's views travel as 8 bits (a quarter of the bytes, in shared memory and on the
                    # bus) and are normalised one view of one batch at a time, where the backbone runs.
                    if view_inputs["pixel_values"].dtype == torch.uint8:
                        view_inputs["pixel_values"] = transform.normalise(view_inputs["pixel_values"])
                    view_inputs = move_model_inputs(view_inputs, device, model_dtype)
                    with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                        embeddings = frozen_image_embeddings(model, **view_inputs)  # [B, D]
                    features[view, done : done + filled] = embeddings.to(settings.features_dtype)
                done += filled
                bar.update(1)
                pending, filled, batch_index = [], 0, batch_index + 1
    finally:
        bar.close()
        del iterator  # stops the workers now, not when the caller's traceback lets go of this frame
    return features.cpu()


def _on_device(chunk: _Chunk, transform: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The chunk's views on ``device``: ``{input name: [V, k, ...]}``, made there from decoded images if asked."""
    if chunk.images is not None:
        images = chunk.images.to(device, non_blocking=True)
        return {"pixel_values": render_views(images, output_size=transform.output_size, resample=transform.resample)}
    return {key: value.to(device, non_blocking=True) for key, value in chunk.views.items()}
