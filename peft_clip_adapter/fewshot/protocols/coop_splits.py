"""CoOp's split files (``split_zhou_<Dataset>.json``): the train / val / test lists every follow-up paper uses.

A file holds ``{"train": [[relative path, label, class name], ...], "val": [...], "test": [...]}``, the paths
relative to the dataset's image folder (``2750/`` for EuroSAT, ``images/`` for DTD, ...). The few-shot pool is
``train`` (CoOp samples its shots there); ``test`` is only ever used for the final accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import datasets

#: How many missing images an error names.
NAMED_MISSING = 3


def find_split_file(folder: str | os.PathLike) -> Optional[Path]:
    """The ``split_zhou_*.json`` file in ``folder``, or ``None``; ``ValueError`` if there are several."""
    found = sorted(Path(folder).glob("split_zhou_*.json"))
    if len(found) > 1:
        raise ValueError(f"{folder} holds several split files {[path.name for path in found]}; keep one.")
    return found[0] if found else None


def _image_root(folder: Path, entries: list[list]) -> Path:
    """The folder the file's paths are relative to: the dataset folder or one of its sub-folders."""
    first = entries[0][0]
    for candidate in [folder, *sorted(path for path in folder.iterdir() if path.is_dir())]:
        if (candidate / first).is_file():
            return candidate
    return folder


def read_coop_split(split_file: str | os.PathLike) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """``(train, test, class names)`` of a CoOp split file, as image datasets with ``ClassLabel`` labels.

    Raises ``ValueError`` for a file without ``train`` or ``test``, labels that disagree with the names, or
    images it names that do not exist (the first few named, with the count).
    """
    split_file = Path(split_file)
    splits = json.loads(split_file.read_text())
    absent = [name for name in ("train", "test") if not splits.get(name)]
    if absent:
        raise ValueError(f"{split_file} has no {absent} list(s); a CoOp split file has train, val and test.")
    names: dict[int, str] = {}
    for _, label, name in splits["train"] + splits["test"]:
        if names.setdefault(int(label), name) != name:
            raise ValueError(f"{split_file} gives label {label} two class names: {names[int(label)]!r} and {name!r}.")
    class_names = [names[label] for label in sorted(names)]
    root = _image_root(split_file.parent, splits["train"])
    missing = [
        str(root / path) for part in ("train", "test") for path, _, _ in splits[part] if not (root / path).is_file()
    ]
    if missing:
        raise ValueError(
            f"{split_file} names {len(missing)} images that do not exist, e.g. {missing[:NAMED_MISSING]}; put the "
            f"dataset's images under {root} as the file's paths say."
        )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})

    def dataset(part: str) -> datasets.Dataset:
        rows = {
            "image": [str(root / path) for path, _, _ in splits[part]],
            "label": [int(entry[1]) for entry in splits[part]],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    return dataset("train"), dataset("test"), class_names
