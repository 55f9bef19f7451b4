"""The paper's 11 datasets: where each lives on disk, its class names and template, and the reported accuracy.

Layout that ``reproduce.py`` reads (the CoOp-style splits every follow-up paper uses, as image folders)::

    <data_root>/<folder>/train/<class name>/<image>     # the training split the shots are sampled from
    <data_root>/<folder>/test/<class name>/<image>      # the test split, used only for the final accuracy

Class names are the sub-folder names (``_`` becomes a space in prompts), so rename the folders to the
names the paper's prompts use (CoOp's ``split_zhou_*.json`` files list them, e.g. Caltech101's
``Faces_easy`` is ``face``); ``prepare_from_coop_split`` builds the layout from such a file. For ImageNet,
``train/`` holds the ILSVRC-2012 training set and ``test/`` its validation set, with folders renamed from
WordNet ids to CLIP's class names. A dataset that lives elsewhere is pointed to with
``reproduce.py --dataset_dir KEY=PATH``; one on the Hub with ``--dataset_hub KEY=ID[:CONFIG]``, which
exports it to this layout once (``export_hub_dataset``).

Reported accuracy: CLIP-Adapter with an RN50 backbone (Gao et al., 2021), as in DESIGN.md section 1.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class PaperDataset:
    """One of the paper's datasets.

    Args:
        key: Short name (the CoOp key, also the ``templates.DATASET_TEMPLATES`` key).
        name: Name in the paper's table.
        folder: Folder under ``--data_root`` (CoOp's folder name).
        template: Key of the prompt template in ``peft_clip_adapter.fewshot.templates``.
        source: Where the images come from originally.
        zero_shot: Reported zero-shot CLIP accuracy (RN50, %); ``None`` for a dataset not in the paper.
        accuracy: Reported CLIP-Adapter accuracy at 1, 2, 4, 8, 16 shots (RN50, %), or ``None``.
    """

    key: str
    name: str
    folder: str
    template: str
    source: str
    zero_shot: Optional[float]
    accuracy: Optional[tuple[float, float, float, float, float]]

    def paper_accuracy(self, shots: int) -> Optional[float]:
        """The reported accuracy at ``shots`` shots per class, or ``None`` if the paper has no such column.

        Example:
            >>> DATASETS["eurosat"].paper_accuracy(16), DATASETS["eurosat"].paper_accuracy(3)
            (84.43, None)
        """
        return dict(zip(SHOTS, self.accuracy or (), strict=False)).get(shots)


_TABLE = [
    ("imagenet", "ImageNet", "imagenet", "ILSVRC-2012 (image-net.org); test = val", 60.32,
     (61.20, 61.52, 61.84, 62.68, 63.59)),
    ("caltech101", "Caltech101", "caltech-101", "Caltech101, CoOp split_zhou_Caltech101.json", 85.92,
     (88.60, 89.37, 89.98, 91.40, 92.49)),
    ("oxford_pets", "OxfordPets", "oxford_pets", "Oxford-IIIT Pet, CoOp split_zhou_OxfordPets.json", 85.83,
     (85.99, 86.73, 87.46, 87.65, 87.84)),
    ("stanford_cars", "StanfordCars", "stanford_cars", "Stanford Cars, CoOp split_zhou_StanfordCars.json", 55.74,
     (55.13, 58.74, 62.45, 67.89, 74.01)),
    ("oxford_flowers", "Flowers102", "oxford_flowers", "Oxford 102 Flowers, CoOp split_zhou_OxfordFlowers.json",
     66.02, (73.49, 81.61, 87.17, 91.72, 93.90)),
    ("food101", "Food101", "food-101", "Food-101, CoOp split_zhou_Food101.json", 77.32,
     (76.82, 77.22, 77.92, 78.04, 78.25)),
    ("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "FGVC-Aircraft 2013b (variant), official train+val/test",
     17.10, (17.49, 20.10, 22.59, 26.25, 32.10)),
    ("sun397", "SUN397", "sun397", "SUN397, CoOp split_zhou_SUN397.json", 58.52, (61.30, 63.29, 65.96, 67.50, 69.55)),
    ("dtd", "DTD", "dtd", "Describable Textures, CoOp split_zhou_DescribableTextures.json", 42.20,
     (45.80, 51.48, 56.86, 61.00, 65.96)),
    ("eurosat", "EuroSAT", "eurosat", "EuroSAT RGB, CoOp split_zhou_EuroSAT.json", 37.52,
     (61.40, 63.90, 73.38, 77.93, 84.43)),
    ("ucf101", "UCF101", "ucf101", "UCF101 middle frames, CoOp split_zhou_UCF101.json", 61.35,
     (62.20, 67.12, 69.05, 73.30, 76.76)),
]  # fmt: skip

#: The 11 datasets by key, in the paper's order.
#: (Each template is the dataset's own entry of ``DATASET_TEMPLATES``, which uses the same keys.)
DATASETS: dict[str, PaperDataset] = {
    key: PaperDataset(key, name, folder, key, source, zero_shot, accuracy)
    for key, name, folder, source, zero_shot, accuracy in _TABLE
}

#: The generated dataset of ``reproduce.py --smoke`` (not in the paper: no reported numbers).
SMOKE_DATASET = PaperDataset(
    "shapes",
    "Shapes (generated)",
    "shapes",
    "default",
    "peft_clip_adapter.testing.tiny_models.write_shapes_dataset",
    None,
    None,
)

#: The paper's mean over the 11 datasets: zero-shot, then 1, 2, 4, 8, 16 shots.
PAPER_MEAN = (58.89, 62.67, 65.55, 68.61, 71.40, 74.44)


def parse_dataset_keys(text: str) -> list[str]:
    """``"all"`` or comma-separated keys of ``DATASETS``.

    Raises:
        ValueError: for an unknown key (the message lists the known ones).

    Example:
        >>> parse_dataset_keys("eurosat,dtd")
        ['eurosat', 'dtd']
        >>> len(parse_dataset_keys("all"))
        11
    """
    if text.strip() == "all":
        return list(DATASETS)
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in DATASETS]
    if not keys or unknown:
        raise ValueError(f"Unknown dataset(s) {unknown or text!r}; choose 'all' or keys from {list(DATASETS)}.")
    return keys


def prepare_from_coop_split(
    split_file: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> dict[str, int]:
    """Build ``out_dir/{train,test}/<class name>/`` from a CoOp ``split_zhou_*.json`` file, with symlinks.

    CoOp's split files hold ``{"train": [[relative path, label, class name], ...], "val": ..., "test": ...}``.
    CoOp's ``train`` and ``val`` lists together are the pool few-shot samples come from (CoOp samples
    its validation shots from ``val``); both become ``train/`` here, ``test`` becomes ``test/``.

    Args:
        split_file: The JSON split file.
        image_dir: The folder the paths in the file are relative to.
        out_dir: The dataset's folder under ``--data_root``.

    Returns:
        Images linked per split, ``{"train": ..., "test": ...}``.

    Raises:
        ValueError: if the file lacks a split, or an image it lists does not exist (the first one is named).
    """
    splits = json.loads(Path(split_file).read_text())
    missing = [name for name in ("train", "val", "test") if name not in splits]
    if missing:
        raise ValueError(f"{split_file} has no {missing} split(s); a CoOp split file has train, val and test.")
    counts = {}
    for target, sources in (("train", ("train", "val")), ("test", ("test",))):
        counts[target] = 0
        for source in sources:
            for relative, _label, classname in splits[source]:
                image = Path(image_dir) / relative
                if not image.is_file():
                    raise ValueError(f"{image} (listed in {split_file}) does not exist; check image_dir.")
                link = Path(out_dir) / target / classname / f"{counts[target]:06d}{image.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(image.resolve())
                counts[target] += 1
    return counts


def export_hub_dataset(
    dataset_id: str,
    out_dir: str | os.PathLike,
    *,
    config_name: Optional[str] = None,
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
) -> dict[str, int]:
    """Write a Hub dataset (or a local dataset folder) as ``out_dir/{train,test}/<class name>/`` images.

    ``reproduce.py`` reads every dataset through that layout, so a dataset on the Hub is exported once
    (the image bytes are copied as they are, not re-encoded) and then treated like a local one. Class
    names are the ``ClassLabel`` names of the label column; a finished export is marked and reused.

    Args:
        dataset_id: A Hub dataset id, or a path that ``datasets.load_dataset`` reads.
        out_dir: The dataset's folder to write.
        config_name: The dataset's configuration, if it has several.
        test_split: The split used as ``test/`` (the only one accuracy is reported on).
        image_column: Column holding the images.
        label_column: Column holding the labels; it must be a ``ClassLabel`` (the names become folders).

    Returns:
        Images written per split, ``{"train": ..., "test": ...}``.

    Raises:
        ValueError: if the dataset lacks the ``train`` or ``test_split`` split (the splits are listed), or
            its label column has no class names.

    Example:
        >>> import tempfile
        >>> from peft_clip_adapter.testing.tiny_models import write_shapes_dataset
        >>> root = tempfile.mkdtemp()
        >>> _ = write_shapes_dataset(f"{root}/src/train", images_per_class=2)
        >>> _ = write_shapes_dataset(f"{root}/src/test", images_per_class=1, seed=1)
        >>> export_hub_dataset(f"{root}/src", f"{root}/out")
        {'train': 8, 'test': 4}
    """
    import datasets
    from PIL import Image

    out_dir = Path(out_dir)
    marker = out_dir / ".export-complete.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    loaded = datasets.load_dataset(dataset_id, config_name)
    missing = [split for split in ("train", test_split) if split not in loaded]
    if missing:
        raise ValueError(
            f"{dataset_id} has no {missing} split(s); its splits are {sorted(loaded)}. Pass --hub_test_split."
        )
    feature = loaded["train"].features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"{dataset_id}'s column {label_column!r} is {feature!r}, not a ClassLabel: the class names are needed "
            "for the prompts. Export it to image folders named by class instead."
        )
    counts = {}
    for target, split in (("train", "train"), ("test", test_split)):
        rows = loaded[split].cast_column(image_column, datasets.Image(decode=False))
        counts[target] = 0
        for index, (image, label) in enumerate(zip(rows[image_column], rows[label_column], strict=True)):
            data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
            suffix = "." + (Image.open(io.BytesIO(data)).format or "png").lower()
            folder = out_dir / target / feature.names[label].replace("/", " ")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:07d}{suffix}").write_bytes(data)
            counts[target] += 1
    marker.write_text(json.dumps(counts))
    return counts


#: Published 16-shot averages over the 11 datasets (%), as (backbone, method, average); CLIP-LoRA's is approximate.
PUBLISHED_16_SHOT_AVERAGES = (
    ("RN50", "zero-shot", 58.9),
    ("RN50", "tip-adapter", 70.3),
    ("RN50", "clip-adapter", 74.4),
    ("RN50", "tip-adapter-f", 75.8),
    ("ViT-B/16", "clip-adapter", 79.9),
    ("ViT-B/16", "CoOp", 79.0),
    ("ViT-B/16", "tip-adapter-f", 81.2),
    ("ViT-B/16", "lora", 82.9),
)

#: Cross-domain targets of ImageNet: key -> folder under ``--data_root`` (CoOp's folder names), each with ``test/``.
IMAGENET_VARIANTS = {
    "imagenet_v2": "imagenetv2",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet_a": "imagenet-adversarial",
    "imagenet_r": "imagenet-rendition",
}
