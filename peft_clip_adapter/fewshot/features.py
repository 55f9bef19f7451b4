"""Frozen image features: the backbone runs once per image and augmented view, then the adapter trains on them.

CLIP-Adapter never needs the backbone's gradients, yet the reference trainer re-ran it every step.
``extract_image_features`` runs it once per image and view (adapters disabled: the raw pooled embedding), and
``FeatureCache`` keeps the result on disk, so a rerun with the same model, rows, transform, views and
precision skips the backbone::

    cache = FeatureCache("feature-cache")
    train = cache.load_or_extract(model, train_split, build_train_transform(processor), views=10)
    features, labels = train.flatten()  # [V*N, D], [V*N]: train the head on these
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peft_clip_adapter.atomic import atomic_path, remove_abandoned
from peft_clip_adapter.families import embedding_width
from peft_clip_adapter.fewshot.data import check_columns
from peft_clip_adapter.fewshot.embeddings import model_device, unwrap_model
from peft_clip_adapter.fewshot.inputs.loader import (
    ExtractionSettings,
    encode_views,
    resolve_extraction,
    row_batches,
    split_batches,
)
from peft_clip_adapter.layer import PREFIX
from peft_clip_adapter.manifest import apply_default_permissions

logger = logging.getLogger(__name__)

#: Bumped whenever the file layout or the key recipe changes, so old cache files are never misread.
#: 2: the image-content digest in the dataset fingerprint. 3: views resampled from boxes of the whole image,
#: JPEG draft decoding, the view device, autocast and stored dtype in the key.
CACHE_FORMAT_VERSION = 3

# Config entries that name where a model came from rather than what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")


@dataclass
class FeatureSet:
    """Pooled image embeddings of ``N`` images under ``V`` views, with their labels.

    Args:
        features: ``[V, N, D]`` float32 (float16 / bfloat16 when extracted so): ``features[v, i]`` is view ``v``
            of image ``i``.
        labels: ``[N]`` int64 class indices.

    Raises ``ValueError`` for wrong ranks or dtypes, or a different ``N`` in features and labels.

    Example:
        >>> [tuple(t.shape) for t in FeatureSet(torch.zeros(2, 3, 4), torch.tensor([0, 1, 1])).flatten()]
        [(6, 4), (6,)]
    """

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.dim() != 3 or self.features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"features must be a float32 [V, N, D] tensor (views, images, width; float16 or bfloat16 when asked "
                f"for), got {self.features.dtype} of shape {tuple(self.features.shape)}."
            )
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be an int64 [N] tensor, got {self.labels.dtype} {tuple(self.labels.shape)}."
            )
        if self.labels.shape[0] != self.features.shape[1]:
            raise ValueError(
                f"features hold {self.features.shape[1]} images but labels hold {self.labels.shape[0]}; "
                "they must match."
            )

    @property
    def num_views(self) -> int:
        """``V``, augmented views per image."""
        return self.features.shape[0]

    @property
    def num_images(self) -> int:
        """``N``, the number of images."""
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        """``D``, the embedding width."""
        return self.features.shape[2]

    def flatten(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All views as one training set, ``([V*N, D], [V*N])``: row ``v * N + i`` is view ``v`` of image ``i``."""
        return self.features.reshape(-1, self.dim), self.labels.repeat(self.num_views)


def _check_extraction_args(
    dataset: datasets.Dataset, *, views: int, batch_size: int, image_column: str, label_column: str
) -> None:
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views={views!r} must be an integer >= 1 (augmented views per image).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
    check_columns(dataset, image_column, label_column)
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows; there are no images to extract features from.")


def dataset_labels(dataset: datasets.Dataset, label_column: str = "label") -> torch.Tensor:
    """The label column as ``[N]`` int64.

    Raises ``ValueError`` for a label that is not an integer >= 0 (encode string labels with
    ``dataset.class_encode_column``; drop unlabelled ``-1`` rows).
    """
    values = list(dataset[label_column])
    bad = [value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < 0]
    if bad:
        raise ValueError(
            f"Label column {label_column!r} must hold class indices >= 0, found {bad[0]!r}. Encode string labels "
            f"with dataset.class_encode_column({label_column!r}) and drop unlabelled (-1) rows."
        )
    return torch.tensor(values, dtype=torch.int64)


def _undecoded(dataset: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """Just the image column, left as ``{"path", "bytes"}`` so that ``load_image`` decodes it (and names
    any file it cannot read) instead of ``datasets`` failing on row access."""
    images = dataset.select_columns([image_column])
    if isinstance(dataset.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))
    return images


def _projection_width(model: nn.Module) -> int:
    return embedding_width(unwrap_model(model), "vision")


def _gather_rows(accelerator, local: torch.Tensor, rows: list[int], num_rows: int) -> torch.Tensor:
    """Gather every process's ``[V, n_p, D]`` slice into ``[V, num_rows, D]`` in the original row order."""
    device = accelerator.device
    features = accelerator.pad_across_processes(local.transpose(0, 1).contiguous().to(device), dim=0)  # [n_max, V, D]
    index = accelerator.pad_across_processes(torch.tensor(rows, dtype=torch.int64, device=device), pad_index=-1)
    features, index = accelerator.gather(features).cpu(), accelerator.gather(index).cpu()  # [P*n_max, V, D], [P*n_max]
    keep = index >= 0  # padding rows carry index -1
    if sorted(index[keep].tolist()) != list(range(num_rows)):
        raise RuntimeError("Gathered feature rows do not cover the dataset exactly once; the processes disagree.")
    result = torch.empty(num_rows, *features.shape[1:], dtype=features.dtype)  # [N, V, D]
    result[index[keep]] = features[keep]
    return result.transpose(0, 1).contiguous()  # [V, N, D]


def extract_image_features(
    model: nn.Module,
    dataset: datasets.Dataset,
    transform,
    *,
    views: int = 1,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    accelerator=None,
    show_progress: bool = False,
    num_workers: Optional[int] = None,
    views_on_device: Optional[bool] = None,
    mixed_precision: Optional[str] = None,
    features_dtype: torch.dtype = torch.float32,
) -> FeatureSet:
    """Run the frozen image backbone once per row and view; return the raw pooled embeddings, ``[views, N, D]`` on CPU.

    Adapters are disabled, so the features are the base model's own projection output, to which
    ``CLIPAdapterClassifier`` applies the vision adapter. Rows are cut into fixed batches by index and processes
    take whole batches, so the features are bitwise identical for any ``num_workers`` and number of processes.

    Args:
        model: A ``PeftModel`` around a dual encoder, or the plain model, in any dtype.
        transform: An ``ImageTransform``, called with the row number as ``index``.
        views: Augmented views per image (1 with an eval transform).
        accelerator: Whole batches are split across its processes and gathered, so every process returns all
            features, in order; its ``mixed_precision`` applies.
        show_progress: A bar on a terminal (local main process only), else a log line now and then.
        num_workers: DataLoader workers per process (0: decode in the main process). ``None``: for a GPU one per
            core up to 8, for a CPU backbone one per 8 cores; at most one per 32 images.
        views_on_device: Make the views on the model's device (fixed-size transforms only; agrees with the CPU
            to one 8-bit level). ``None``: yes on a GPU, no on the CPU.
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"`` (``"fp8"`` autocasts to bf16). ``None``: the
            accelerator's setting, else ``"no"``.
        features_dtype: float32, float16 or bfloat16.

    Raises:
        ValueError: for ``views`` or ``batch_size`` < 1, a negative ``num_workers``, an unknown precision or
            dtype, a missing column (listing those there are), an empty dataset, non-integer labels, an
            unreadable image (named), or a model without a vision tower.
        RuntimeError: if a DataLoader worker died.
    """
    _check_extraction_args(
        dataset, views=views, batch_size=batch_size, image_column=image_column, label_column=label_column
    )
    options = dict(num_workers=num_workers, views_on_device=views_on_device, mixed_precision=mixed_precision)
    settings = _resolve(model, transform, accelerator, features_dtype=features_dtype, **options)
    return _extract(
        model,
        dataset,
        transform,
        settings,
        views=views,
        image_column=image_column,
        label_column=label_column,
        batch_size=batch_size,
        accelerator=accelerator,
        show_progress=show_progress,
    )


def _device(model: nn.Module, accelerator) -> torch.device:
    return accelerator.device if accelerator is not None else model_device(unwrap_model(model))


def _resolve(model: nn.Module, transform, accelerator, **options: Any) -> ExtractionSettings:
    """The extraction settings for this model's device (or the accelerator's), checked."""
    return resolve_extraction(transform, _device(model, accelerator), accelerator=accelerator, **options)


def _extract(
    model: nn.Module,
    dataset: datasets.Dataset,
    transform,
    settings: ExtractionSettings,
    *,
    views: int,
    image_column: str,
    label_column: str,
    batch_size: int,
    accelerator,
    show_progress: bool,
) -> FeatureSet:
    labels = dataset_labels(dataset, label_column)  # [N]
    width = _projection_width(model)
    batches = split_batches(row_batches(len(dataset), batch_size), accelerator)  # whole batches per process
    local = encode_views(
        model,
        _undecoded(dataset, image_column),
        batches,
        transform,
        views=views,
        image_column=image_column,
        device=_device(model, accelerator),
        settings=settings,
        width=width,
        progress=show_progress and (accelerator is None or accelerator.is_local_main_process),
    )  # [V, n_local, D]
    if accelerator is None or accelerator.num_processes == 1:
        return FeatureSet(local, labels)
    rows = [row for batch in batches for row in batch]
    return FeatureSet(_gather_rows(accelerator, local, rows, len(dataset)), labels)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of everything in ``model`` that shapes its frozen image embeddings.

    The config (minus where it was loaded from) and every parameter and buffer except adapters and the text side,
    by name, dtype, shape and value; a ``PeftModel`` and its base model share a fingerprint.
    """
    inner = unwrap_model(model)
    digest = hashlib.sha256()
    config = getattr(inner, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = {}
    for name, tensor in [*inner.named_parameters(), *inner.named_buffers()]:
        parts = [part for part in name.split(".") if part != "base_layer"]
        if any(part.startswith((PREFIX, "text_")) for part in parts) or parts[-1] == "logit_scale":
            continue
        tensors[".".join(parts)] = tensor
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def dataset_fingerprint(dataset: datasets.Dataset, image_column: str = "image", label_column: str = "label") -> str:
    """A hash of the exact rows: the ``datasets`` fingerprint, the labels and every image's bytes.

    Two samples of one split never share a key, and an image replaced on disk under the same path and mtime gives a
    new one. Reading every image costs about 1 GB/s of SHA-256 per core (``benchmarks/cache_key.py``), a small
    fraction of decoding them. Raises ``ValueError`` as ``dataset_labels``.
    """
    digest = hashlib.sha256()
    digest.update(f"{dataset._fingerprint}|{len(dataset)}|".encode())
    digest.update(_tensor_bytes(dataset_labels(dataset, label_column)))
    # Undecoded values are {"path", "bytes"}: embedded bytes are the image; otherwise its file is read.
    for value in _undecoded(dataset, image_column)[image_column]:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path") or b""
        if isinstance(value, (bytes, bytearray)):
            digest.update(b"bytes:%d:" % len(value))
            digest.update(value)
        elif isinstance(value, (str, os.PathLike)):
            _update_with_file(digest, value)
        else:
            digest.update(repr(value).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _update_with_file(digest: Any, path: str | os.PathLike) -> None:
    """Hash the content of the image file ``path``; a file that cannot be read is hashed by its path (its
    extraction then fails and names it)."""
    try:
        with open(path, "rb") as handle:
            digest.update(b"file:")
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        digest.update(f"unreadable:{os.fspath(path)}".encode())


def _digest(feature_set: FeatureSet) -> str:
    digest = hashlib.sha256(_tensor_bytes(feature_set.features))
    digest.update(_tensor_bytes(feature_set.labels))
    return digest.hexdigest()


def _key_of(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:32]


def _as_os_error(error: SafetensorError) -> OSError:
    """safetensors reports I/O failures (a full disk) as its own error type: make them the ``OSError`` they
    are, so the atomic writer names the file."""
    found = re.search(r"os error (\d+)", str(error))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else str(error))


class FeatureCache:
    """An on-disk cache of ``FeatureSet`` s, one safetensors file per key, never silently stale.

    The key hashes the model, the rows, the columns, the transform's ``description``, the views, where views are
    made, the autocast and stored dtypes: a change in any is a new file. Worker and process counts are not in
    it (they do not change the features). Files are written atomically (``peft_clip_adapter.atomic``) and carry
    a checksum, so a damaged file is detected, logged and recomputed. ``cache_dir`` is created on the first write.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        #: Whether the last ``load_or_extract`` call was served from disk, and the file it used.
        self.last_hit: Optional[bool] = None
        self.last_path: Optional[Path] = None

    def key_components(
        self,
        model: nn.Module,
        dataset: datasets.Dataset,
        transform,
        *,
        views: int,
        image_column: str = "image",
        label_column: str = "label",
        settings: Optional[ExtractionSettings] = None,
    ) -> dict[str, Any]:
        """What the cache key is made of (also stored, readable, in each file's metadata).

        ``settings`` (from ``inputs.loader.resolve_extraction``) defaults to views on the CPU, no autocast, float32.
        Raises ``ValueError`` if ``transform`` has no ``description`` string to identify it.
        """
        description = getattr(transform, "description", None)
        if not isinstance(description, str) or not description:
            raise ValueError(
                f"{type(transform).__name__} has no `description` string, so cached features could not be told "
                "apart from another transform's. Use peft_clip_adapter.fewshot.data.build_train_transform / "
                "build_eval_transform, or give your transform a stable `description`."
            )
        return {
            "format": CACHE_FORMAT_VERSION,
            "model": model_fingerprint(model),
            "dataset": dataset_fingerprint(dataset, image_column, label_column),
            "image_column": image_column,
            "label_column": label_column,
            "transform": description,
            "views": views,
            **(settings or ExtractionSettings(False, "no", torch.float32, 0)).key_components(),
        }

    def key(self, model: nn.Module, dataset: datasets.Dataset, transform, **kwargs: Any) -> str:
        """The cache key, 32 hex digits: a hash of ``key_components`` (same arguments)."""
        return _key_of(self.key_components(model, dataset, transform, **kwargs))

    def path(self, key: str) -> Path:
        """``<cache_dir>/image-features-<key>.safetensors``, which may not exist yet."""
        return self.cache_dir / f"image-features-{key}.safetensors"

    def load(self, key: str) -> Optional[FeatureSet]:
        """The cached ``FeatureSet`` of ``key``; ``None`` if absent, or if damaged (logged as a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                feature_set = FeatureSet(handle.get_tensor("features"), handle.get_tensor("labels"))
            if metadata.get("key") != key or metadata.get("digest") != _digest(feature_set):
                raise ValueError("its key or checksum does not match its content")
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
            logger.warning("Feature cache file %s is damaged (%s); recomputing it.", path, error)
            return None
        return feature_set

    def save(self, key: str, feature_set: FeatureSet, components: Optional[dict[str, Any]] = None) -> Path:
        """Write ``feature_set`` under ``key`` all at once, or not at all; returns the file.

        ``components`` are stored in the metadata for inspection. A failed write (a full disk) raises ``OSError``
        naming the file and leaves no partial one.
        """
        metadata = {"key": key, "digest": _digest(feature_set), "components": json.dumps(components or {})}
        tensors = {"features": feature_set.features.contiguous(), "labels": feature_set.labels.contiguous()}
        remove_abandoned(self.path(key))  # temporaries of runs killed mid-write (SIGKILL skips the cleanup)
        # Readers see either no file or a whole one; a failed write names the file and leaves nothing.
        with atomic_path(self.path(key)) as temporary:
            try:
                save_file(tensors, temporary, metadata=metadata)
            except SafetensorError as error:
                raise _as_os_error(error) from error
            apply_default_permissions(temporary)  # safetensors writes 0600; a shared cache is read by the team
        return self.path(key)

    def load_or_extract(
        self,
        model: nn.Module,
        dataset: datasets.Dataset,
        transform,
        *,
        views: int = 1,
        image_column: str = "image",
        label_column: str = "label",
        batch_size: int = 64,
        accelerator=None,
        show_progress: bool = False,
        num_workers: Optional[int] = None,
        views_on_device: Optional[bool] = None,
        mixed_precision: Optional[str] = None,
        features_dtype: torch.dtype = torch.float32,
    ) -> FeatureSet:
        """``extract_image_features`` (same arguments), from disk when already computed.

        With an ``accelerator`` every process must call it; the local main process writes the file and every
        process returns all features. ``last_hit`` and ``last_path`` say whether the file was reused and which it
        is. The file is written only after extraction finished, so an interrupted run (Ctrl-C, a dead worker)
        leaves no file. Raises as ``extract_image_features`` and ``key_components``.
        """
        columns = {"views": views, "image_column": image_column, "label_column": label_column}
        _check_extraction_args(dataset, batch_size=batch_size, **columns)
        options = dict(num_workers=num_workers, views_on_device=views_on_device, mixed_precision=mixed_precision)
        settings = _resolve(model, transform, accelerator, features_dtype=features_dtype, **options)
        components = self.key_components(model, dataset, transform, settings=settings, **columns)
        key = _key_of(components)
        cached = self.load(key)
        hit = cached is not None
        if accelerator is not None and accelerator.num_processes > 1:
            # Extraction is collective, so all processes must agree on whether to run it.
            flags = accelerator.gather(torch.tensor([hit], dtype=torch.int64, device=accelerator.device))
            hit = bool(flags.min().item())
        self.last_hit, self.last_path = hit, self.path(key)
        if hit:
            logger.info("Loaded %d x %d cached image features from %s", views, len(dataset), self.last_path)
            return cached
        feature_set = _extract(
            model,
            dataset,
            transform,
            settings,
            batch_size=batch_size,
            accelerator=accelerator,
            show_progress=show_progress,
            **columns,
        )
        if accelerator is None or accelerator.is_local_main_process:
            self.save(key, feature_set, components)
            logger.info("Cached %d x %d image features in %s", views, len(dataset), self.last_path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return feature_set
