"""Few-shot data: load a labelled image dataset, hold out validation, sample k shots per class.

Plain ``datasets.Dataset`` objects with an image column and a ``ClassLabel`` (or integer) label column, for
the trainer and a hand-written loop alike::

    splits = load_image_classification_data(train_dir="my_images/")  # "train" + held-out "validation"
    train = sample_few_shot(splits["train"], shots=16, seed=1)        # 16 images per class, seeded

No randomness comes from a global generator: the held-out split and the sample depend only on ``seed`` and
the dataset (never on the number of processes). Image reading and the transforms are re-exported from
``inputs.images`` and ``inputs.transforms``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np

# The image reading and transforms live in their own modules; they are part of this module's API too.
from peft_clip_adapter.fewshot.inputs.images import load_image, to_rgb
from peft_clip_adapter.fewshot.inputs.transforms import (
    ImageTransform,
    build_eval_transform,
    build_train_transform,
    check_index,
)

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
    """Load an image classification dataset as ``"train"`` and ``"validation"`` (and ``"test"`` if present) splits.

    The source is ``dataset_name`` (a Hub id, local dataset, or ``save_to_disk`` folder) or ``train_dir``
    (``<dir>/<class name>/<image>``, with an optional ``validation_dir`` of the same classes). Without a
    validation split, a stratified, seeded ``validation_fraction`` of the training images is held out
    (``hold_out_validation``). String labels are encoded.

    Raises ``ValueError`` for both or neither source, ``validation_dir`` without ``train_dir``, a missing or empty
    folder or class folder, no ``"train"`` split (listing the splits), missing columns (listing the columns),
    fewer than 2 classes, or ``validation_fraction`` outside (0, 1).
    """
    if (dataset_name is None) == (train_dir is None):
        raise ValueError(
            "Pass exactly one data source: dataset_name (a Hub dataset id) or train_dir (an image folder), "
            f"got dataset_name={dataset_name!r} and train_dir={train_dir!r}."
        )
    if dataset_name is not None:
        if validation_dir is not None:
            raise ValueError("validation_dir goes with train_dir, not with dataset_name; pass one source only.")
        loaded = _load_dataset(dataset_name, dataset_config_name)
    else:
        # Each folder is read on its own: the imagefolder builder drops labels when files sit at different
        # depths, which a train and a validation folder in different places would.
        train = _load_image_folder(train_dir, "train_dir", label_column)
        loaded = datasets.DatasetDict({"train": train})
        if validation_dir is not None:
            validation = _load_image_folder(validation_dir, "validation_dir", label_column)
            loaded["validation"] = _relabel_like(validation, train, label_column)
    return prepare_image_classification_data(
        loaded,
        image_column=image_column,
        label_column=label_column,
        validation_fraction=validation_fraction,
        seed=seed,
    )


@contextlib.contextmanager
def _no_download_bar() -> Iterator[None]:
    """Hide datasets' bars while it reads local files: they sit behind a "Downloading data: N files" bar
    (drawn for 16 files or more whatever ``DownloadConfig.disable_tqdm`` says), but nothing is downloaded."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _load_dataset(dataset_name: str | os.PathLike, dataset_config_name: str | None) -> datasets.DatasetDict:
    """A Hub id or local dataset folder, or a folder written by ``save_to_disk``.

    ``load_dataset`` refuses a saved ``Dataset`` ("use load_from_disk"), which a command line has no way to
    call, so such folders (recognised by the files ``save_to_disk`` writes) are read with ``load_from_disk``.
    """
    folder = os.fspath(dataset_name)
    if any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json")):
        return datasets.load_from_disk(folder)
    with _no_download_bar() if os.path.isdir(folder) else contextlib.nullcontext():
        return datasets.load_dataset(folder, dataset_config_name)


def _load_image_folder(folder: str | os.PathLike, argument: str, label_column: str) -> datasets.Dataset:
    """Load ``<folder>/<class name>/<image>`` with the imagefolder builder, checking that it has classes."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not os.path.isdir(folder):
        raise ValueError(f"{argument}={os.fspath(folder)!r} is not a folder.")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    if not any(os.path.splitext(name)[1].lower() in extensions for _, _, files in os.walk(folder) for name in files):
        raise ValueError(
            f"{argument}={os.fspath(folder)!r} holds no image files; expected "
            "<folder>/<class name>/<image>.png|jpg|..."
        )
    empty = _empty_class_folders(folder, extensions)
    if empty:
        # The imagefolder builder takes classes from the images' folders, so these would silently vanish.
        raise ValueError(
            f"{argument}={os.fspath(folder)!r} has class folders without images: {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}. Every class needs images (.png, .jpg, ...); add some or remove "
            "the folder."
        )
    # data_files (not data_dir) so that sub-folders named "train" or "val" are not taken for splits.
    with _no_download_bar():
        dataset = datasets.load_dataset("imagefolder", data_files={"train": os.path.join(folder, "**")}, split="train")
    if label_column not in dataset.column_names and label_column == "label":
        # imagefolder only adds a "label" column when it finds two or more class sub-folders.
        raise ValueError(
            f"{argument}={os.fspath(folder)!r} gives no class labels: images are read as "
            "<folder>/<class name>/<image>, and classification needs at least 2 class sub-folders."
        )
    return dataset


def _empty_class_folders(folder: str | os.PathLike, extensions: set[str]) -> list[str]:
    """The class sub-folders of ``folder`` (hidden ones aside) that hold no image file at any depth."""
    empty = []
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = (name for _, _, names in os.walk(entry.path) for name in names)
        if not any(os.path.splitext(name)[1].lower() in extensions for name in files):
            empty.append(entry.name)
    return empty


def _relabel_like(dataset: datasets.Dataset, reference: datasets.Dataset, label_column: str) -> datasets.Dataset:
    """Renumber ``dataset``'s class ids to follow ``reference``'s class list, matching classes by name."""
    if label_column not in dataset.column_names:
        return dataset  # reported by check_columns, with the columns there are
    names = reference.features[label_column].names
    own = dataset.features[label_column].names
    unknown = sorted(set(own) - set(names))
    if unknown:
        raise ValueError(
            f"The validation folder has classes {unknown} that the training folder lacks; the training "
            f"classes are {names}."
        )
    if own == names:
        return dataset
    ids = [names.index(name) for name in own]
    features = dataset.features.copy()
    features[label_column] = datasets.ClassLabel(names=names)
    return dataset.map(
        lambda labels: {label_column: [ids[label] for label in labels]},
        input_columns=label_column,
        batched=True,
        features=features,
    )


def prepare_image_classification_data(
    dataset: datasets.Dataset | datasets.DatasetDict,
    *,
    image_column: str = "image",
    label_column: str = "label",
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> datasets.DatasetDict:
    """``load_image_classification_data`` for a dataset already in memory (a ``Dataset`` is the training split).

    String labels become one ``ClassLabel`` over all splits, so ids agree. Raises ``ValueError`` as that function.
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
    """Check that the image and label columns exist and the labels are a ``ClassLabel``, integers or strings.

    Raises ``ValueError`` naming the missing column and listing those the dataset has.
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
    """Class names in label order; integer labels give ``["0", ..., str(max label)]`` so logit ``i`` stays label ``i``.

    Raises ``ValueError`` for a missing column, labels that are not class ids, or negative labels.

    Example:
        >>> class_names(datasets.Dataset.from_dict({"label": [2, 0, 2]}))
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


def hold_out_validation(
    dataset: datasets.Dataset,
    *,
    validation_fraction: float = 0.2,
    label_column: str = "label",
    seed: int = 0,
) -> datasets.DatasetDict:
    """Split into ``"train"`` and ``"validation"``, holding out ``round(validation_fraction * n)`` of every class.

    Each class keeps at least one training image; which rows go depends only on ``seed`` and the class's rows,
    and both splits keep the row order. Raises ``ValueError`` for ``validation_fraction`` outside (0, 1), a bad
    seed, or too few images to hold any out.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    check_index("seed", seed)
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
    """Draw ``shots`` images of every class, seeded, keeping the dataset's row order.

    Each class draws from a generator seeded with ``(seed, class id)``: the same sample on every run and
    process (sample before sharding). ``allow_fewer`` takes all images of a class that has fewer. Raises
    ``ValueError`` for ``shots < 1``, a bad seed or label column, or (unless ``allow_fewer``) naming every class
    with fewer than ``shots`` images (with a ``ClassLabel``, one with none counts too).
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1 (images per class), got {shots!r}.")
    check_index("seed", seed)
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
