"""Frozen image features: the backbone runs once per image and augmented view, then the adapter trains on them.

The CLIP backbone never needs gradients in CLIP-Adapter, yet the reference trainer re-runs it on every
step. Here ``extract_image_features`` runs it once per image and view (adapters disabled, so the result
is the raw ``visual_projection`` output), fed by DataLoader workers (:mod:`peft_clip_adapter.fewshot.inputs.loader`),
and ``FeatureCache`` keeps the result on disk, so the next run with the same model, rows, transform,
views and precision skips the backbone altogether::

    cache = FeatureCache("feature-cache")
    train = cache.load_or_extract(model, train_split, build_train_transform(processor), views=10)
    head = CLIPAdapterClassifier.from_model(model, prompts)
    features, labels = train.flatten()  # [V*N, D], [V*N]: train the head on these
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

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
        features: ``[V, N, D]`` float32 (or float16 / bfloat16, when extracted with ``features_dtype``):
            ``features[v, i]`` is view ``v`` of image ``i``.
        labels: ``[N]`` int64 class indices.

    Raises:
        ValueError: for wrong ranks, dtypes, or a different ``N`` in features and labels.

    Example:
        >>> feature_set = FeatureSet(torch.zeros(2, 3, 4), torch.tensor([0, 1, 1]))
        >>> feature_set.num_views, feature_set.num_images, feature_set.dim
        (2, 3, 4)
        >>> [tuple(t.shape) for t in feature_set.flatten()]
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
        """``V``, the number of augmented views per image (``features.shape[0]``)."""
        return self.features.shape[0]

    @property
    def num_images(self) -> int:
        """``N``, the number of images (``features.shape[1]``)."""
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        """``D``, the embedding width (``features.shape[2]``, CLIP's ``projection_dim``)."""
        return self.features.shape[2]

    def flatten(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All views as one training set: row ``v * N + i`` is view ``v`` of image ``i``.

        Returns:
            ``([V*N, D] features, [V*N] labels)``.

        Example:
            >>> feature_set = FeatureSet(torch.zeros(2, 3, 4), torch.tensor([0, 1, 1]))
            >>> features, labels = feature_set.flatten()
            >>> labels.tolist()
            [0, 1, 1, 0, 1, 1]
        """
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
    """The label column as an int64 tensor ``[N]``.

    Args:
        dataset: A ``datasets.Dataset``.
        label_column: Name of its integer label column.

    Returns:
        ``[N]`` int64 labels, in row order.

    Raises:
        ValueError: if a label is not a non-negative integer (string labels need
            ``dataset.class_encode_column(label_column)`` first; ``-1`` marks unlabelled rows).

    Example:
        >>> dataset_labels(datasets.Dataset.from_dict({"label": [2, 0]}))
        tensor([2, 0])
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
    """Run the frozen image backbone once per row and view; return the raw pooled embeddings.

    Adapters are disabled while the backbone runs, so the features are CLIP's own ``visual_projection``
    output, to which ``CLIPAdapterClassifier`` applies the (trainable) vision adapter. DataLoader workers
    decode each image once, with all its views, ahead of the backbone (see :mod:`.inputs.loader`);
    the rows are cut into fixed batches by index and processes take whole batches, so the features are
    bitwise identical for any ``num_workers`` and number of processes.

    Args:
        model: A ``PeftModel`` around a CLIP model, or a plain ``CLIPModel`` /
            ``CLIPVisionModelWithProjection``, in any dtype (``from_pretrained(..., dtype=torch.bfloat16)``).
        dataset: A ``datasets.Dataset`` with an image column and an integer / ``ClassLabel`` label column.
        transform: An ``ImageTransform`` from ``peft_clip_adapter.fewshot.data``: ``transform(image, index=,
            view=) -> [3, H, W]`` (or a dict of model inputs, as SigLIP 2 NaFlex's); it is called with the
            row number as ``index``.
        views: Augmented views per image (use 1 with a deterministic eval transform).
        image_column: Name of the image column.
        label_column: Name of the label column.
        batch_size: Images per backbone forward pass.
        accelerator: An ``accelerate.Accelerator``: whole batches are split across its processes and
            gathered, so every process returns ALL features, in order. Its ``mixed_precision`` applies.
        show_progress: Show progress (on the local main process only): a bar on a terminal, else a log line
            now and then.
        num_workers: DataLoader worker processes per process; 0 decodes in the main process. ``None``
            (default): feeding a GPU, one per available core, up to 8; with the backbone on the CPU, one per 8
            cores (its threads need the rest); one per 32 images at most either way (see
            ``peft_clip_adapter.fewshot.inputs.loader.default_num_workers``).
        views_on_device: Make the views on the model's device from the decoded images, with the same boxes
            as on the CPU (the library's fixed-size transforms only; SigLIP 2 NaFlex views are made on the
            CPU by its processor, with a warning when this is ``True``). ``None`` (default): on a GPU yes,
            on the CPU no. The two agree to one 8-bit level per pixel.
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"`` (or ``"fp8"``, autocast to bf16): run the backbone
            under ``torch.autocast``. ``None`` (default): the accelerator's setting, else ``"no"``.
        features_dtype: Dtype of the returned features: float32 (default), float16 or bfloat16.

    Returns:
        A ``FeatureSet`` with ``[views, len(dataset), D]`` features (on CPU) and the labels.

    Raises:
        ValueError: for ``views`` or ``batch_size`` < 1, a negative ``num_workers``, an unknown
            ``mixed_precision`` or ``features_dtype``, a missing column (the message lists the columns
            there are), an empty dataset, non-integer labels, an unreadable image (named, also when a worker
            read it), or a model without a vision tower.
        RuntimeError: if a DataLoader worker process died.

    Example:
        >>> import tempfile
        >>> from transformers import AutoProcessor, CLIPModel
        >>> from peft_clip_adapter.fewshot.data import build_eval_transform
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip, write_shapes_dataset
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> root = write_shapes_dataset(tempfile.mkdtemp(), images_per_class=2)
        >>> dataset = datasets.load_dataset("imagefolder", data_dir=root, split="train")
        >>> transform = build_eval_transform(AutoProcessor.from_pretrained(path).image_processor)
        >>> feature_set = extract_image_features(CLIPModel.from_pretrained(path), dataset, transform, num_workers=0)
        >>> tuple(feature_set.features.shape), feature_set.labels.tolist()
        ((1, 8, 32), [0, 0, 1, 1, 2, 2, 3, 3])
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

    Covers the config (minus where it was loaded from) and every parameter and buffer except adapters
    and the text side (``text_*`` modules, ``logit_scale``), by name, dtype, shape and value. peft's
    wrapping is ignored, so a ``PeftModel`` and its plain base model share a fingerprint.

    Args:
        model: A CLIP model, a ``PeftModel`` around one, or any module.

    Returns:
        A hex digest string.

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(a), model_fingerprint(a) == model_fingerprint(b)
        (True, False)
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
    """A hash of the exact rows of ``dataset``: its ``datasets`` fingerprint, its labels and its images' content.

    The ``datasets`` fingerprint changes with every ``select`` / ``map`` / ``shuffle``; the labels and the
    bytes of every image are hashed too (the file's content for images stored as paths), so two samples of
    one split never share a key, and an image replaced on disk under the same path, even with the same
    modification time, gives a new key. Hashing reads every image once: SHA-256 runs at about 1 GB/s on
    one core of a current CPU (``python benchmarks/cache_key.py`` measures it against an extraction on
    your machine), a small fraction of decoding the same images.

    Args:
        dataset: A ``datasets.Dataset``.
        image_column: Name of its image column.
        label_column: Name of its label column.

    Returns:
        A hex digest string.

    Raises:
        ValueError: if a label is not a non-negative integer (as ``dataset_labels``).

    Example:
        >>> data = datasets.Dataset.from_dict({"image": [b"a", b"b"], "label": [0, 1]})
        >>> dataset_fingerprint(data) == dataset_fingerprint(data.select([1, 0]))
        False
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


class FeatureCache:
    """An on-disk cache of ``FeatureSet`` s, one safetensors file per key, never silently stale.

    The key hashes the model (``model_fingerprint``, which covers its dtype), the dataset rows
    (``dataset_fingerprint``), the image and label columns, the transform's ``description`` (which covers
    how it decodes), the number of views, where the views are made (CPU or device), the autocast dtype and
    the stored dtype: a change in any of them is a new file. The number of DataLoader workers and of
    processes is not in the key: it does not change the features. Files are written atomically (temporary
    file + ``os.replace``) and carry a checksum, so a truncated or damaged file is detected, logged and
    recomputed.

    Args:
        cache_dir: Folder for the cache files (created when first written).

    Raises:
        ValueError: from ``load_or_extract`` / ``key_components`` for a transform without a
            ``description`` or bad extraction arguments (see ``extract_image_features``).

    Example:
        >>> import tempfile
        >>> from transformers import AutoProcessor, CLIPModel
        >>> from peft_clip_adapter.fewshot.data import build_eval_transform
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip, write_shapes_dataset
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> root = write_shapes_dataset(tempfile.mkdtemp(), images_per_class=1)
        >>> dataset = datasets.load_dataset("imagefolder", data_dir=root, split="train")
        >>> model = CLIPModel.from_pretrained(path)
        >>> transform = build_eval_transform(AutoProcessor.from_pretrained(path).image_processor)
        >>> cache = FeatureCache(tempfile.mkdtemp())
        >>> first = cache.load_or_extract(model, dataset, transform)
        >>> cache.last_hit
        False
        >>> torch.equal(cache.load_or_extract(model, dataset, transform).features, first.features), cache.last_hit
        (True, True)
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

        Args:
            model: The CLIP model (or PeftModel) the features come from; its weights are fingerprinted.
            dataset: The rows to encode; their content is fingerprinted.
            transform: The image transform; its ``description`` string identifies it.
            views: Augmented views per image.
            image_column: Name of the image column.
            label_column: Name of the label column.
            settings: How extraction runs (``inputs.loader.resolve_extraction``); ``None``: views
                on the CPU, no autocast, float32 features.

        Returns:
            ``{"format", "model", "dataset", "image_column", "label_column", "transform", "views",
            "views_made_on", "autocast", "features_dtype"}``.

        Raises:
            ValueError: if ``transform`` has no ``description`` string to identify it.

        Example:
            >>> import tempfile
            >>> cache = FeatureCache(tempfile.mkdtemp())
            >>> cache.key_components(torch.nn.Linear(2, 2), datasets.Dataset.from_dict({"label": [0]}), len, views=1)
            Traceback (most recent call last):
            ...
            ValueError: builtin_function_or_method has no `description` string, ...
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
        """The cache key (32 hex digits): a hash of ``key_components``.

        Args:
            model: As ``key_components``.
            dataset: As ``key_components``.
            transform: As ``key_components``.
            **kwargs: ``views`` (required), ``image_column``, ``label_column``, ``settings``, as
                ``key_components``.

        Returns:
            32 lowercase hex digits.

        Raises:
            ValueError: as ``key_components``.

        Example:
            See the class example; ``load_or_extract`` computes the key for you.
        """
        return _key_of(self.key_components(model, dataset, transform, **kwargs))

    def path(self, key: str) -> Path:
        """The file that holds (or will hold) the features of ``key``.

        Args:
            key: A key from ``key``.

        Returns:
            ``<cache_dir>/image-features-<key>.safetensors`` (it may not exist yet).

        Example:
            >>> FeatureCache("cache").path("0" * 32).name
            'image-features-00000000000000000000000000000000.safetensors'
        """
        return self.cache_dir / f"image-features-{key}.safetensors"

    def load(self, key: str) -> Optional[FeatureSet]:
        """The cached ``FeatureSet`` of ``key``; ``None`` if absent, or damaged (logged as a warning).

        Args:
            key: A key from ``key``.

        Returns:
            The ``FeatureSet``, or ``None`` (absent, truncated, or its checksum or key does not match).

        Example:
            >>> import tempfile
            >>> cache = FeatureCache(tempfile.mkdtemp())
            >>> cache.load("0" * 32) is None
            True
        """
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
        """Write ``feature_set`` under ``key`` atomically; returns the file's path.

        Args:
            key: A key from ``key``.
            feature_set: The features to store.
            components: The key's ``key_components``, stored in the file's metadata for inspection.

        Returns:
            The written file, ``path(key)``.

        Raises:
            OSError: if ``cache_dir`` cannot be created or written.

        Example:
            >>> import tempfile
            >>> cache = FeatureCache(tempfile.mkdtemp())
            >>> feature_set = FeatureSet(torch.zeros(2, 3, 4), torch.tensor([0, 1, 1]))
            >>> path = cache.save("0" * 32, feature_set)
            >>> torch.equal(cache.load("0" * 32).features, feature_set.features)
            True
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        metadata = {"key": key, "digest": _digest(feature_set), "components": json.dumps(components or {})}
        tensors = {"features": feature_set.features.contiguous(), "labels": feature_set.labels.contiguous()}
        handle, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=".partial-", suffix=".safetensors")
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            apply_default_permissions(temporary)  # mkstemp makes 0600; a shared cache is read by the team
            # Readers see either no file or a whole one, even if this process dies mid-write.
            os.replace(temporary, self.path(key))
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
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
        """The features of ``extract_image_features`` (same arguments), from disk when already computed.

        With an ``accelerator``, every process must call this; extraction (when needed) is shared across
        them, the local main process writes the file, and every process returns all features.
        ``last_hit`` and ``last_path`` then say whether the file was reused and which file it is. The file
        is written only once extraction has finished: an interrupted run (Ctrl-C, a dead worker) leaves
        no file behind, whole or partial.

        Args:
            model: As ``extract_image_features``.
            dataset: As ``extract_image_features``.
            transform: As ``extract_image_features``; it must have a ``description`` string.
            views: As ``extract_image_features``.
            image_column: As ``extract_image_features``.
            label_column: As ``extract_image_features``.
            batch_size: As ``extract_image_features``.
            accelerator: As ``extract_image_features``.
            show_progress: As ``extract_image_features``.
            num_workers: As ``extract_image_features`` (not part of the key).
            views_on_device: As ``extract_image_features``.
            mixed_precision: As ``extract_image_features``.
            features_dtype: As ``extract_image_features``.

        Returns:
            The ``FeatureSet`` (``[views, len(dataset), D]`` features and ``[len(dataset)]`` labels).

        Raises:
            ValueError: as ``extract_image_features``, or for a transform without ``description``.
            RuntimeError: if a DataLoader worker process died (no file is written).

        Example:
            See the class example.
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
