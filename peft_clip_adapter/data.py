"""Few-shot data for CLIP-Adapter: load a labelled image dataset, sample k shots per class, preprocess images.

Everything works on plain ``datasets.Dataset`` objects with an image column and a ``ClassLabel`` (or
integer) label column, so it serves the example trainer and a hand-written loop alike::

    splits = load_image_classification_data(train_dir="my_images/")  # "train" + held-out "validation"
    train = sample_few_shot(splits["train"], shots=16, seed=1)        # 16 images per class, seeded
    transform = build_train_transform(processor.image_processor, seed=1)
    pixels = transform(load_image(train[0]["image"]), index=0, view=3)  # [3, 224, 224], always the same crop

Randomness never comes from a global generator: the held-out split and the k-shot sample depend only on
``seed`` and the dataset (never on how many processes run), and augmented view ``v`` of image ``i`` is a
pure function of ``(seed, i, v)``, which is what lets frozen features be cached and reused.
"""

from __future__ import annotations

import abc
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

__all__ = [
    "ImageTransform",
    "build_eval_transform",
    "build_train_transform",
    "check_columns",
    "class_names",
    "hold_out_validation",
    "load_image",
    "load_image_classification_data",
    "prepare_image_classification_data",
    "sample_few_shot",
    "to_rgb",
]

# Streams of the per-class random generators, so that the held-out split and the k-shot sample drawn
# with the same seed are independent draws.
_HOLD_OUT_STREAM = 1
_FEW_SHOT_STREAM = 2


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking a labelled image dataset


def load_image_classification_data(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    validation_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load an image classification dataset as ``"train"`` and ``"validation"`` splits.

    The source is either a dataset on the Hub (or a local dataset folder) loaded with
    ``datasets.load_dataset(dataset_name, dataset_config_name)``, or image folders laid out as
    ``<dir>/<class name>/<image>`` (loaded with the ``imagefolder`` builder, train and validation together
    so that both get the same class list). When the source has no validation split, a stratified, seeded
    ``validation_fraction`` of the training images is held out (see :func:`hold_out_validation`).

    Args:
        dataset_name: Hub dataset id or local dataset path. Exclusive with ``train_dir``.
        dataset_config_name: Configuration of ``dataset_name``, if it has several.
        train_dir: Folder of training images, one sub-folder per class.
        validation_dir: Folder of validation images, same class sub-folders. Only with ``train_dir``.
        image_column: Column holding the images.
        label_column: Column holding the labels (``ClassLabel``, integers, or strings, which are encoded).
        validation_fraction: Share of each class held out when there is no validation split, in (0, 1).
        seed: Seed of the held-out split.

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"validation"`` (and ``"test"`` when the source has one).

    Raises:
        ValueError: for both or neither of ``dataset_name`` and ``train_dir``, ``validation_dir`` without
            ``train_dir``, a missing or empty folder, a source without a ``"train"`` split (the splits there
            are are listed), missing columns (the columns there are are listed), fewer than 2 classes, or a
            ``validation_fraction`` outside (0, 1).

    Example:
        >>> import tempfile
        >>> from peft_clip_adapter.offline import write_shapes_dataset
        >>> root = write_shapes_dataset(tempfile.mkdtemp(), images_per_class=5)
        >>> splits = load_image_classification_data(train_dir=root, seed=0)
        >>> splits.num_rows
        {'train': 16, 'validation': 4}
    """
    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            "Pass exactly one data source: dataset_name (a Hub dataset id) or train_dir (an image folder), "
            f"got dataset_name={dataset_name!r} and train_dir={train_dir!r}."
        )
    if dataset_name is not None:
        if validation_dir is not None:
            raise ValueError("validation_dir goes with train_dir, not with dataset_name; pass one source only.")
        loaded = datasets.load_dataset(dataset_name, dataset_config_name)
    else:
        data_files = {"train": _image_files_pattern(train_dir, "train_dir")}
        if validation_dir is not None:
            data_files["validation"] = _image_files_pattern(validation_dir, "validation_dir")
        loaded = datasets.load_dataset("imagefolder", data_files=data_files)
        if label_column not in loaded["train"].column_names and label_column == "label":
            # imagefolder only adds a "label" column when it finds two or more class sub-folders.
            raise ValueError(
                f"train_dir={os.fspath(train_dir)!r} gives no class labels: images are read as "
                "<folder>/<class name>/<image>, and classification needs at least 2 class sub-folders."
            )
    return prepare_image_classification_data(
        loaded,
        image_column=image_column,
        label_column=label_column,
        validation_fraction=validation_fraction,
        seed=seed,
    )


def _image_files_pattern(folder: str | os.PathLike, argument: str) -> str:
    """The ``data_files`` glob of an image folder, after checking that it holds at least one image."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not os.path.isdir(folder):
        raise ValueError(f"{argument}={os.fspath(folder)!r} is not a folder.")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return os.path.join(os.fspath(folder), "**")
    raise ValueError(
        f"{argument}={os.fspath(folder)!r} holds no image files; expected <folder>/<class name>/<image>.png|jpg|..."
    )


def prepare_image_classification_data(
    dataset: datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Check a loaded dataset and give it ``"train"`` and ``"validation"`` splits.

    This is :func:`load_image_classification_data` for a dataset already in memory. A ``Dataset`` counts as
    the training split. String labels are encoded as a ``ClassLabel`` (over all splits, so ids agree).

    Args:
        dataset: A ``Dataset`` or a ``DatasetDict`` with a ``"train"`` split.
        image_column: Column holding the images.
        label_column: Column holding the labels.
        validation_fraction: Share of each class held out when there is no ``"validation"`` split, in (0, 1).
        seed: Seed of the held-out split.

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"validation"`` (and ``"test"`` when ``dataset`` has one).

    Raises:
        ValueError: for a missing ``"train"`` split, missing columns, labels that are neither class ids nor
            strings, fewer than 2 classes in ``"train"``, or a bad ``validation_fraction``.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features, Value
        >>> features = Features({"image": Value("string"), "label": ClassLabel(names=["cat", "dog"])})
        >>> data = Dataset.from_dict({"image": [f"{i}.png" for i in range(10)], "label": [0, 1] * 5}, features)
        >>> prepare_image_classification_data(data, validation_fraction=0.4).num_rows
        {'train': 6, 'validation': 4}
    """
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split; its splits are {sorted(dataset)}.")
    for split in dataset.values():
        check_columns(split, image_column, label_column)
    if _is_string(dataset["train"].features[label_column]):
        # One sorted class list over all splits (DatasetDict.class_encode_column would number each split apart).
        names = sorted({name for split in dataset.values() for name in split.unique(label_column)})
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=names))

    train = dataset["train"]
    present = sorted(set(_label_array(train, label_column).tolist()))
    if len(present) < 2:
        names = class_names(train, label_column)
        found = [names[label] for label in present]
        raise ValueError(
            f"Classification needs at least 2 classes, but the training split has {len(present)}: {found}. "
            "Image folders need one sub-folder per class."
        )
    splits = {"train": train}
    if "validation" in dataset:
        splits["validation"] = dataset["validation"]
    else:
        held_out = hold_out_validation(
            train, validation_fraction=validation_fraction, label_column=label_column, seed=seed
        )
        splits.update(held_out)
    if "test" in dataset:
        splits["test"] = dataset["test"]
    return datasets.DatasetDict(splits)


def check_columns(dataset: datasets.Dataset, image_column: str, label_column: str) -> None:
    """Check that ``dataset`` has the image and label columns, and that the labels are class ids.

    Args:
        dataset: The dataset to check.
        image_column: Name of the image column.
        label_column: Name of the label column.

    Raises:
        ValueError: naming the missing column and listing the columns the dataset has, or for a label
            column that holds neither a ``ClassLabel``, integers nor strings.

    Example:
        >>> from datasets import Dataset
        >>> data = Dataset.from_dict({"img": ["a.png"], "label": [0]})
        >>> check_columns(data, "image", "label")
        Traceback (most recent call last):
        ...
        ValueError: Image column 'image' not found; the dataset has columns ['img', 'label']. ...
    """
    columns = list(dataset.column_names)
    for kind, column in (("Image", image_column), ("Label", label_column)):
        if column not in columns:
            flag = "--image_column_name" if kind == "Image" else "--label_column_name"
            raise ValueError(
                f"{kind} column {column!r} not found; the dataset has columns {columns}. Pick one with {flag}."
            )
    feature = dataset.features[label_column]
    if not (isinstance(feature, datasets.ClassLabel) or _is_integer_or_string(feature)):
        raise ValueError(
            f"Label column {label_column!r} has type {feature}; it must be a ClassLabel, integers or strings."
        )


def _is_integer_or_string(feature: Any) -> bool:
    return _is_string(feature) or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def class_names(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """Names of the classes, in label order: position ``i`` names label ``i``.

    Args:
        dataset: The dataset.
        label_column: Its label column: a ``ClassLabel`` gives its names; integer labels give
            ``["0", "1", ..., str(max label)]``, so that logit ``i`` still belongs to label ``i``.

    Returns:
        One name per class id.

    Raises:
        ValueError: for a missing label column (listing the columns there are), labels that are not class
            ids, or negative integer labels.

    Example:
        >>> from datasets import Dataset
        >>> class_names(Dataset.from_dict({"label": [2, 0, 2]}))
        ['0', '1', '2']
    """
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not found; the dataset has columns {dataset.column_names}.")
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = _label_array(dataset, label_column)
    return [str(label) for label in range(int(labels.max()) + 1 if len(labels) else 0)]


def _label_array(dataset: datasets.Dataset, label_column: str) -> np.ndarray:
    """The label column as int64 class ids ``[N]``, after checking that they are class ids."""
    feature = dataset.features[label_column]
    if not (isinstance(feature, datasets.ClassLabel) or _is_integer_or_string(feature)) or _is_string(feature):
        raise ValueError(
            f"Label column {label_column!r} has type {feature}; it must hold class ids (a ClassLabel or integers). "
            f"Encode other labels with dataset.class_encode_column({label_column!r})."
        )
    labels = np.asarray(list(dataset[label_column]), dtype=np.int64)  # [N]
    if len(labels) and labels.min() < 0:
        raise ValueError(
            f"Label column {label_column!r} holds the negative label {int(labels.min())} (unlabelled rows); "
            f"drop them first, e.g. dataset.filter(lambda row: row[{label_column!r}] >= 0)."
        )
    return labels


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")


def hold_out_validation(
    dataset: datasets.Dataset,
    *,
    validation_fraction: float = 0.2,
    label_column: str = "label",
    seed: int = 0,
) -> datasets.DatasetDict:
    """Split ``dataset`` into ``"train"`` and ``"validation"``, holding out the same share of every class.

    Each class with ``n`` images gives ``round(validation_fraction * n)`` of them to validation, but always
    keeps at least one for training. Which images go depends only on ``seed`` and the class's rows; both
    splits keep the dataset's row order.

    Args:
        dataset: The split to divide.
        validation_fraction: Share held out per class, in (0, 1).
        label_column: Column of class ids.
        seed: Seed of the draw (integer >= 0).

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"validation"``.

    Raises:
        ValueError: for ``validation_fraction`` outside (0, 1), a bad seed, or too few images to hold any out.

    Example:
        >>> from datasets import Dataset
        >>> data = Dataset.from_dict({"label": [0] * 10 + [1] * 5})
        >>> split = hold_out_validation(data, validation_fraction=0.2, seed=0)
        >>> sorted(split["validation"]["label"])
        [0, 0, 1]
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    _check_seed(seed)
    labels = _label_array(dataset, label_column)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)  # rows of this class, in dataset order
        # Round half up (Python's round() would send 2.5 to 2) and never empty a class's training share.
        count = min(math.floor(validation_fraction * len(members) + 0.5), len(members) - 1)
        rng = np.random.default_rng([seed, int(label), _HOLD_OUT_STREAM])
        validation.extend(rng.permutation(members)[:count].tolist())
    if not validation:
        raise ValueError(
            f"Too few images ({len(labels)}) to hold out a validation_fraction of {validation_fraction}; "
            "pass a validation split (--validation_dir) or a larger dataset."
        )
    held_out = np.zeros(len(labels), dtype=bool)
    held_out[validation] = True
    return datasets.DatasetDict(
        {
            "train": dataset.select(np.flatnonzero(~held_out).tolist()),
            "validation": dataset.select(np.flatnonzero(held_out).tolist()),
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# k-shot sampling


def sample_few_shot(
    dataset: datasets.Dataset,
    shots: int,
    *,
    label_column: str = "label",
    seed: int = 0,
    allow_fewer: bool = False,
) -> datasets.Dataset:
    """Draw ``shots`` images of every class, seeded, from the whole dataset.

    Each class draws its images from its own generator seeded with ``(seed, class id)``, so the sample
    depends only on the dataset, ``shots`` and ``seed``: the same on every run and every process of a
    distributed job (sample before sharding). The rows keep the dataset's order.

    Args:
        dataset: Dataset with a ``ClassLabel`` or integer label column.
        shots: Images per class (the "k" of k-shot), at least 1.
        label_column: Column of class ids.
        seed: Seed of the draw (integer >= 0).
        allow_fewer: Take all images of a class that has fewer than ``shots`` instead of failing.

    Returns:
        The selected rows, ``shots`` per class (fewer only with ``allow_fewer``).

    Raises:
        ValueError: for ``shots < 1``, a bad seed or label column, or (unless ``allow_fewer``) a class with
            fewer than ``shots`` images, naming every such class and its count. With a ``ClassLabel``, a
            class with no image at all counts too.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features
        >>> features = Features({"label": ClassLabel(names=["cat", "dog"])})
        >>> data = Dataset.from_dict({"label": [0, 1, 0, 1, 0, 0]}, features=features)
        >>> list(sample_few_shot(data, 2, seed=0)["label"])
        [1, 0, 1, 0]
        >>> sample_few_shot(data, 3)
        Traceback (most recent call last):
        ...
        ValueError: 3-shot sampling needs 3 images per class, but class 'dog' has 2. ...
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1 (images per class), got {shots!r}.")
    _check_seed(seed)
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not found; the dataset has columns {dataset.column_names}.")
    labels = _label_array(dataset, label_column)
    feature = dataset.features[label_column]
    # A ClassLabel knows every class, including one with no image; integer labels only know those present.
    classes = range(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else np.unique(labels).tolist()
    names = class_names(dataset, label_column)

    members = {label: np.flatnonzero(labels == label) for label in classes}  # rows of each class, in order
    short = {label: len(rows) for label, rows in members.items() if len(rows) < shots}
    if short and not allow_fewer:
        listed = ", ".join(f"class {names[label]!r} has {count}" for label, count in short.items())
        raise ValueError(
            f"{shots}-shot sampling needs {shots} images per class, but {listed}. Lower shots, or pass "
            "allow_fewer=True to take all images of those classes."
        )
    chosen = []
    for label, rows in members.items():
        rng = np.random.default_rng([seed, int(label), _FEW_SHOT_STREAM])
        chosen.extend(rng.permutation(rows)[:shots].tolist())
    return dataset.select(sorted(chosen))


# ----------------------------------------------------------------------------------------------------------------
# Reading images

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


# ----------------------------------------------------------------------------------------------------------------
# Transforms: a PIL image -> a normalised tensor [3, H, W], with the model's own image processor settings


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
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W] uint8
        # Scale in float64 then cast, exactly as the processor does.
        scaled = pixels.double() * self.rescale_factor if self.rescale_factor is not None else pixels
        pixels = scaled.float()  # [3, H, W]
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
            std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
            pixels = (pixels - mean) / std  # [3, H, W]
        return pixels.contiguous()

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
        for name, number in (("index", index), ("view", view)):
            if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {number!r}.")
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
    _check_seed(seed)
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
