"""Few-shot baselines side by side on one protocol: datasets x shots x seeds, beside the papers' numbers.

    python benchmarks/reproduce.py --offline --methods all --protocol few-shot     # no network: micro-CLIP tasks
    python benchmarks/reproduce.py --model_name_or_path openai/clip-vit-base-patch16 --data_root data \\
        --methods all --protocol base2novel --shots 16
    python benchmarks/reproduce.py --model_name_or_path ... --data_root data --protocol cross-domain   # ImageNet
    python benchmarks/reproduce.py --smoke     # offline: tiny CLIP + generated images, end to end in a minute

Methods (``--methods``, comma-separated or ``all``), each with one hyperparameter protocol that never reads a
test image or label before the final evaluation (``peft_clip_adapter.fewshot.baselines``): ``zero-shot``,
``linear-probe`` (ZS-LP, one fixed recipe), ``tip-adapter`` and ``tip-adapter-f`` (alpha and beta by k-fold on
the shots), ``clip-adapter`` (ratio ``--ratio``, the paper's 0.2), ``clip-adapter-auto`` (the trainer's
``--ratio auto`` over ``--search_ratios``), ``lora`` (CLIP-LoRA's recipe, end to end on the images).

Each cell (dataset, shots, seed) samples ``shots`` images per class with ``seed`` from the training split,
extracts their features once (``--views`` augmented views and one eval view, through
``fewshot.features.FeatureCache``), and every feature-cache method trains on those same features; the test
split's features are extracted once per dataset. Protocols (``--protocol``): ``few-shot``; ``base2novel``
(CoCoOp's split: sorted classes, first half base; base, novel and their harmonic mean); ``cross-domain``
(train on ``--datasets``, test on ``--targets`` with the same class names).

Data: ``<data_root>/<folder>/{train,test}/<class>/`` (``paper.py``), or a CoOp ``split_zhou_*.json`` file in
the dataset's folder (read as it is, so that numbers compare with the papers'), or a Hub dataset
(``--dataset_hub``); with ``--offline`` the micro-CLIP's generated scene tasks (built once in ``--cache_dir``).

Outputs in ``--output_dir``: ``results.json`` (a row per method, dataset, shots and seed, with its seconds of
training and selection and its chosen hyperparameters), ``results.md`` (mean ± std over seeds, the papers'
numbers beside), ``results.png`` (accuracy against shots per method) and ``timing.json`` (the command, the
shared extraction's and each method's seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchlib import markdown_table
from paper import (
    DATASETS,
    IMAGENET_VARIANTS,
    PUBLISHED_16_SHOT_AVERAGES,
    SHOTS,
    SMOKE_DATASET,
    PaperDataset,
    export_hub_dataset,
    parse_dataset_keys,
)

logger = logging.getLogger("reproduce")

PROTOCOLS = ("few-shot", "base2novel", "cross-domain")
#: The offline tasks of the few-shot and base-to-novel protocols, and the cross-domain pair (clean -> dusk).
OFFLINE_TASKS = ("dusk-pairs", "held-out-pairs")
OFFLINE_CROSS_DOMAIN = ("clean-pairs", "dusk-pairs")
#: Per setting: (views, epochs, CLIP-Adapter's learning rate, smallest crop share). The paper's recipe;
#: offline the views are flips of whole 32 px scenes (as the trainer's offline default); smoke: tiny.
RECIPES = {"paper": (10, 200, 2e-3, 0.08), "offline": (10, 200, 2e-3, 1.0), "smoke": (2, 10, 0.05, 0.08)}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ``ValueError`` s, so that the command line reports one ``error:`` line."""

    def error(self, message: str) -> None:
        raise ValueError(f"{message} (see --help)")


def _int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < minimum for value in values):
        raise ValueError(f"{flag} must be comma-separated whole numbers >= {minimum} (e.g. 1,2,4), got {text!r}.")
    return values


def _ratio_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= value <= 1.0 for value in values):
        raise ValueError(f"--search_ratios must be comma-separated numbers in [0, 1], got {text!r}.")
    return values


def _default_cache_dir() -> str:
    """The trainer's cache (``$HF_HOME/peft-clip-adapter``), so that the offline micro-CLIP is built once for both."""
    xdg_cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(os.environ.get("HF_HOME", os.path.join(xdg_cache, "huggingface")), "peft-clip-adapter")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and check the command line.

    Raises:
        ValueError: for an unknown flag, method, protocol or dataset, a bad list, a missing
            ``--model_name_or_path`` / ``--data_root`` (outside ``--offline`` / ``--smoke``), or a malformed
            ``--dataset_dir`` / ``--dataset_hub``.
    """
    from peft_clip_adapter.fewshot.baselines.methods import METHODS, parse_methods

    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="clip-adapter", help=f"'all' or comma-separated: {', '.join(METHODS)}.")
    parser.add_argument(
        "--protocol", default="few-shot", help=f"One of {', '.join(PROTOCOLS)}, or few-shot,base2novel (both)."
    )
    parser.add_argument("--offline", action="store_true", help="The micro-CLIP's generated scene tasks, no network.")
    parser.add_argument("--model_name_or_path", default=None, help="CLIP checkpoint (Hub id or folder).")
    parser.add_argument("--data_root", default=None, help="Folder holding the datasets (layout: paper.py).")
    parser.add_argument(
        "--dataset_dir", action="append", default=[], help="KEY=PATH: a dataset's folder (train/, test/) elsewhere."
    )
    parser.add_argument(
        "--dataset_hub",
        action="append",
        default=[],
        help="KEY=ID[:CONFIG]: take a dataset from the Hub (exported once to train/, test/ folders).",
    )
    parser.add_argument("--hub_test_split", default="test", help="The split of --dataset_hub datasets tested on.")
    parser.add_argument("--datasets", default="all", help="'all' or comma-separated dataset keys (offline: tasks).")
    parser.add_argument("--targets", default=None, help="cross-domain: comma-separated target datasets.")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="Shots per class, comma-separated.")
    parser.add_argument("--seeds", default="1,2,3", help="Seeds (few-shot sample and training), comma-separated.")
    parser.add_argument("--ratio", type=float, default=0.2, help="clip-adapter's ratio (paper: 0.2).")
    parser.add_argument("--search_ratios", default="0.2,0.4,0.6,0.8", help="Candidates of clip-adapter-auto.")
    parser.add_argument("--num_train_epochs", type=int, default=None, help="CLIP-Adapter's epochs (default 200).")
    parser.add_argument("--views", type=int, default=None, help="Cached augmented views per shot (default 10).")
    parser.add_argument(
        "--lora_iterations_per_shot", type=int, default=500, help="lora: iterations = this x shots (CLIP-LoRA: 500)."
    )
    parser.add_argument("--cache_dir", default=_default_cache_dir(), help="Offline models and tasks (built once).")
    parser.add_argument("--output_dir", default="reproduce-output", help="Where results and the feature cache go.")
    parser.add_argument("--smoke", action="store_true", help="Offline end-to-end run on tiny generated data.")
    args = parser.parse_args(argv)
    args.methods = parse_methods(args.methods)
    args.protocols = [name.strip() for name in args.protocol.split(",") if name.strip()]
    if not args.protocols or any(name not in PROTOCOLS for name in args.protocols):
        raise ValueError(
            f"--protocol must be one of {list(PROTOCOLS)} (or few-shot,base2novel), got {args.protocol!r}."
        )
    if "cross-domain" in args.protocols and len(args.protocols) > 1:
        raise ValueError("--protocol cross-domain trains on other datasets than it tests: run it on its own.")
    args.protocol = args.protocols[0] if len(args.protocols) == 1 else args.protocol
    args.shots = _int_list(args.shots, "--shots")
    args.seeds = _int_list(args.seeds, "--seeds", minimum=0)
    args.search_ratios = _ratio_list(args.search_ratios)
    if not 0.0 <= args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got {args.ratio}.")
    for flag in ("num_train_epochs", "views", "lora_iterations_per_shot"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    args.recipe = "smoke" if args.smoke else "offline" if args.offline else "paper"
    if args.smoke:
        _smoke_setup(args)
    elif args.offline:
        _offline_setup(args)
    else:
        _real_setup(args)
    return args


def _real_setup(args: argparse.Namespace) -> None:
    if args.protocol == "cross-domain":
        args.datasets = "imagenet" if args.datasets == "all" else args.datasets
    args.datasets = [DATASETS[key] for key in parse_dataset_keys(args.datasets)]
    args.dataset_dirs = _dataset_dirs(args)
    if args.model_name_or_path is None:
        raise ValueError(
            "Pass --model_name_or_path (e.g. openai/clip-vit-base-patch16), or --offline / --smoke to run offline."
        )
    if args.protocol == "cross-domain":
        root = Path(args.data_root or ".")
        known = {key: root / folder for key, folder in IMAGENET_VARIANTS.items()}
        known.update({entry.key: root / entry.folder for entry in DATASETS.values()})
        if args.targets is None:
            keys = [key for key in IMAGENET_VARIANTS if known[key].is_dir()]
            if not keys:
                folders = [str(root / folder) for folder in IMAGENET_VARIANTS.values()]
                raise ValueError(f"No cross-domain target: none of {folders} exists; pass --targets.")
        else:
            keys = [key.strip() for key in args.targets.split(",") if key.strip()]
        unknown = [key for key in keys if key not in known]
        if not keys or unknown:
            raise ValueError(f"--targets must name datasets from {list(known)}, got {unknown or args.targets!r}.")
        args.target_dirs = {key: known[key] for key in keys}


def _key_value(item: str, flag: str, value_name: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or key not in DATASETS or not value:
        raise ValueError(f"{flag} must be KEY={value_name} with KEY in {list(DATASETS)}, got {item!r}.")
    return key, value


def _dataset_dirs(args: argparse.Namespace) -> dict[str, Path]:
    overrides = {}
    for item in args.dataset_dir:
        key, path = _key_value(item, "--dataset_dir", "PATH")
        overrides[key] = Path(path)
    # Hub datasets are exported to the same layout under output_dir (see load_dataset_source).
    args.hub_datasets = {}
    for item in args.dataset_hub:
        key, value = _key_value(item, "--dataset_hub", "ID[:CONFIG]")
        dataset_id, _, config_name = value.partition(":")
        args.hub_datasets[key] = (dataset_id, config_name or None)
        overrides[key] = Path(args.output_dir) / "hub-data" / key
    missing = [entry.key for entry in args.datasets if entry.key not in overrides]
    if missing and args.data_root is None:
        raise ValueError(
            f"Pass --data_root (layout: benchmarks/paper.py), --dataset_dir or --dataset_hub for {missing}."
        )
    return {entry.key: overrides.get(entry.key, Path(args.data_root or ".") / entry.folder) for entry in args.datasets}


def _offline_entry(task: str) -> PaperDataset:
    return PaperDataset(task, task, task, "default", "peft_clip_adapter.testing.scene_tasks", None, None)


def _offline_setup(args: argparse.Namespace) -> None:
    """The micro-CLIP and the tasks' train / test folders, built once in ``--cache_dir``."""
    from peft_clip_adapter.testing.offline_default import build_task_folders
    from peft_clip_adapter.testing.scene_tasks import CLEAN_PAIRS, SCENE_TASKS

    tasks = {**SCENE_TASKS, CLEAN_PAIRS.name: CLEAN_PAIRS}
    cross = args.protocol == "cross-domain"
    default = OFFLINE_CROSS_DOMAIN[:1] if cross else OFFLINE_TASKS
    names = list(default) if args.datasets == "all" else [name.strip() for name in args.datasets.split(",")]
    targets = [OFFLINE_CROSS_DOMAIN[1]] if args.targets is None else args.targets.split(",")
    unknown = [name for name in [*names, *(targets if cross else [])] if name not in tasks]
    if unknown:
        raise ValueError(f"Unknown offline task(s) {unknown}; choose from {list(tasks)} (or 'all').")
    folders = {name: build_task_folders(args.cache_dir, tasks[name]) for name in {*names, *(targets if cross else [])}}
    args.model_name_or_path = str(next(iter(folders.values()))[0])
    args.datasets = [_offline_entry(name) for name in names]
    args.dataset_dirs = {name: (folders[name][1], folders[name][2]) for name in names}
    args.hub_datasets = {}
    if cross:
        args.target_dirs = {name: (folders[name][1], folders[name][2]) for name in targets}


def _smoke_setup(args: argparse.Namespace) -> None:
    """Tiny CLIP and a generated train / test image folder under ``output_dir``."""
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip, write_shapes_dataset

    root = Path(args.output_dir) / "smoke-data"
    if not (root / "tiny-clip").is_dir():
        build_tiny_clip(root / "tiny-clip")
        # As many training images as the largest default shot count, so the documented bare --smoke runs.
        write_shapes_dataset(root / "shapes" / "train", images_per_class=max(SHOTS), seed=0)
        write_shapes_dataset(root / "shapes" / "test", images_per_class=6, seed=1)
    args.model_name_or_path = str(root / "tiny-clip")
    args.datasets = [SMOKE_DATASET]
    args.hub_datasets = {}
    args.dataset_dirs = {SMOKE_DATASET.key: root / "shapes"}


# ---------------------------------------------------------------------------------------------------
# Data and features


@dataclass
class LoadedDataset:
    """A dataset's full training pool and test split, its class names, and the test features."""

    key: str
    train: Any
    test: Any
    class_names: list[str]


def load_dataset_source(
    key: str, location: Any, args: argparse.Namespace, *, need_train: bool = True
) -> LoadedDataset:
    """Read a dataset: an offline task's (train, test) folders, a CoOp split file, or ``train/`` and ``test/``."""
    from peft_clip_adapter.fewshot import data
    from peft_clip_adapter.fewshot.protocols.coop_splits import find_split_file, read_coop_split

    if isinstance(location, tuple):
        train_dir, test_dir = location
    else:
        folder = Path(location)
        if key in args.hub_datasets:
            dataset_id, config_name = args.hub_datasets[key]
            counts = export_hub_dataset(dataset_id, folder, config_name=config_name, test_split=args.hub_test_split)
            logger.info("%s: %s exported to %s (%s)", key, dataset_id, folder, counts)
        split_file = find_split_file(folder) if folder.is_dir() else None
        if split_file is not None:
            train, test, names = read_coop_split(split_file)
            return LoadedDataset(key, train, test, names)
        needed = ("train", "test") if need_train else ("test",)
        for split in needed:
            if not (folder / split).is_dir():
                raise ValueError(
                    f"{folder / split} is missing: {key} must be laid out as in paper.py (or hold a split_zhou_ file)."
                )
        train_dir, test_dir = (folder / "train" if need_train else folder / "test"), folder / "test"
    splits = data.load_image_classification_data(train_dir=train_dir, validation_dir=test_dir)
    return LoadedDataset(key, splits["train"], splits["validation"], data.class_names(splits["train"]))


class Extractor:
    """The frozen backbone of one model and its feature cache: every method's features come from here."""

    def __init__(self, model_name_or_path: str, cache_dir: Path, min_crop_scale: float) -> None:
        import torch

        from peft_clip_adapter.fewshot import training
        from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier
        from peft_clip_adapter.fewshot.data import build_eval_transform
        from peft_clip_adapter.fewshot.features import FeatureCache

        self.model, self.processor = training.load_adapted_model(model_name_or_path)
        # The backbone on a GPU when there is one: extraction is the heavy part; the heads train on the CPU.
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.cache = FeatureCache(cache_dir)
        self.eval_transform = build_eval_transform(self.processor.image_processor)
        self.min_crop_scale = min_crop_scale
        self.scale = CLIPAdapterClassifier.from_model(self.model, _empty_prompts(self.model)).logit_scale.exp().item()
        self.seconds = 0.0

    def prompts(self, names: list[str], templates: list[str]) -> Any:
        """``[C, T, D]`` prompt embeddings of ``names``, on the CPU (where the heads train)."""
        from peft_clip_adapter.fewshot.classifier import encode_class_prompts

        return encode_class_prompts(self.model, self.processor, names, templates).cpu()

    def features(self, dataset: Any, *, views: int = 1, seed: Optional[int] = None) -> Any:
        """Cached features: ``views`` augmented views seeded with ``seed``, or the eval view (``seed=None``)."""
        from peft_clip_adapter.fewshot.data import build_train_transform

        start = time.perf_counter()
        transform = self.eval_transform
        if seed is not None:
            image_processor = self.processor.image_processor
            transform = build_train_transform(image_processor, seed=seed, scale=(self.min_crop_scale, 1.0))
        result = self.cache.load_or_extract(self.model, dataset, transform, views=views)
        self.seconds += time.perf_counter() - start
        return result


def _empty_prompts(model: Any) -> Any:
    import torch

    from peft_clip_adapter.families import embedding_width
    from peft_clip_adapter.fewshot.embeddings import unwrap_model

    return torch.zeros(1, 1, embedding_width(unwrap_model(model), "vision"))


# ---------------------------------------------------------------------------------------------------
# Cells


def _subset(features: Any, rows: list[int], labels: list[int]) -> Any:
    import torch

    from peft_clip_adapter.fewshot.features import FeatureSet

    return FeatureSet(features.features[:, rows], torch.tensor(labels, dtype=torch.int64))


def eval_sets(
    protocol: str,
    key: str,
    loaded: LoadedDataset,
    extractor: Extractor,
    templates: list[str],
    args: argparse.Namespace,
) -> tuple[Any, list[str], list[Any]]:
    """The protocol's training pool, its trained class names, and its test sets (features extracted once)."""
    from peft_clip_adapter.fewshot.baselines.methods import EvalSet
    from peft_clip_adapter.fewshot.protocols import base2novel
    from peft_clip_adapter.fewshot.protocols.cross_domain import target_class_indices

    names, test_features = loaded.class_names, extractor.features(loaded.test)
    if protocol == "few-shot":
        prompts = extractor.prompts(names, templates)
        return loaded.train, names, [EvalSet(key, test_features, names, prompts, list(range(len(names))), loaded.test)]
    if protocol == "base2novel":
        base, novel = base2novel.split_classes(names)
        tests = []
        for half, kept in (("base", base), ("novel", novel)):
            rows, labels = base2novel.class_rows(list(loaded.test["label"]), kept, names)
            indices = list(range(len(base))) if half == "base" else None  # novel: classes never trained on
            subset = base2novel.keep_classes(loaded.test, kept, names)
            prompts = extractor.prompts(kept, templates)
            tests.append(EvalSet(half, _subset(test_features, rows, labels), kept, prompts, indices, subset))
        return base2novel.keep_classes(loaded.train, base, names), base, tests
    tests = []
    for target_key, location in args.target_dirs.items():
        target = load_dataset_source(target_key, location, args, need_train=False)
        indices = target_class_indices(names, target.class_names, target_key)
        prompts = extractor.prompts(target.class_names, templates)
        features = extractor.features(target.test)
        tests.append(EvalSet(target_key, features, target.class_names, prompts, indices, target.test))
    return loaded.train, names, tests


def run_dataset(
    entry: PaperDataset, args: argparse.Namespace, extractor: Extractor, protocol: str
) -> list[dict[str, Any]]:
    """Every (shots, seed) cell of one (source) dataset under ``protocol``: a row per method and test set."""
    from peft_clip_adapter.fewshot.baselines.methods import FewShotCell, MethodSettings, run_method
    from peft_clip_adapter.fewshot.data import sample_few_shot
    from peft_clip_adapter.fewshot.templates import resolve_templates

    loaded = load_dataset_source(entry.key, args.dataset_dirs[entry.key], args)
    templates = resolve_templates([entry.template] if entry.key in DATASETS else None, entry.key)
    views, epochs, learning_rate, _ = RECIPES[args.recipe]
    views, epochs = args.views or views, args.num_train_epochs or epochs
    settings = MethodSettings(
        num_train_epochs=epochs, learning_rate=learning_rate, ratio=args.ratio, ratio_grid=tuple(args.search_ratios),
        lora_iterations_per_shot=args.lora_iterations_per_shot,
    )  # fmt: skip
    pool, trained_names, tests = eval_sets(protocol, entry.key, loaded, extractor, templates, args)
    prompts = extractor.prompts(trained_names, templates)
    rows = []
    for shots in args.shots:
        for seed in args.seeds:
            train = sample_few_shot(pool, shots, seed=seed)
            cell = FewShotCell(
                str(args.model_name_or_path), trained_names, templates, prompts, extractor.scale,
                extractor.features(train, views=views, seed=seed), extractor.features(train), shots, seed, train,
            )  # fmt: skip
            for method in args.methods:
                result = run_method(method, cell, tests, settings)
                rows += _rows(method, entry.key, protocol, shots, seed, result)
                logger.info("%s %s %d-shot seed %d: %s", entry.key, method, shots, seed, result.accuracy)
    return rows


def _rows(method: str, dataset: str, protocol: str, shots: int, seed: int, result: Any) -> list[dict[str, Any]]:
    """``results.json`` rows of one method on one cell."""
    from peft_clip_adapter.fewshot.protocols.base2novel import harmonic_mean

    common = {"method": method, "protocol": protocol, "shots": shots, "seed": seed}
    extra = {"seconds": round(result.seconds, 4), "hyperparameters": result.hyperparameters}
    if protocol == "few-shot":
        return [{**common, "dataset": dataset, "accuracy": result.accuracy[dataset], **extra}]
    if protocol == "base2novel":
        base, novel = result.accuracy["base"], result.accuracy["novel"]
        scores = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        return [
            {**common, "dataset": dataset, **scores, "novel_is_zero_shot": "novel" in result.zero_shot_for, **extra}
        ]  # noqa: E501
    return [
        {**common, "dataset": target, "source": dataset, "accuracy": accuracy, **extra}
        for target, accuracy in result.accuracy.items()
    ]


# ---------------------------------------------------------------------------------------------------
# Tables and plot


def _metrics(protocol: str) -> tuple[str, ...]:
    return ("base", "novel", "hm") if protocol == "base2novel" else ("accuracy",)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std over seeds
    return {"mean": round(statistics.fmean(values), 4), "std": round(spread, 4), "n": len(values)}


def paper_number(method: str, dataset: str, shots: int) -> Optional[float]:
    """The papers' reported accuracy for a cell: CLIP-Adapter (RN50) per shots, zero-shot CLIP (RN50), or ``None``.

    Example:
        >>> paper_number("clip-adapter", "eurosat", 16), paper_number("zero-shot", "dtd", 4)
        (84.43, 42.2)
    """
    entry = DATASETS.get(dataset)
    if entry is None:
        return None
    if method == "clip-adapter":
        return entry.paper_accuracy(shots)
    return entry.zero_shot if method == "zero-shot" else None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every metric, per (protocol, method, dataset, shots), with seconds and the papers'.

    Example:
        >>> rows = [{"protocol": "few-shot", "method": "clip-adapter", "dataset": "dtd", "shots": 1, "seed": s,
        ...          "accuracy": a, "seconds": 1.0} for s, a in ((1, 50.0), (2, 54.0))]
        >>> (entry,) = summarise(rows)
        >>> entry["accuracy"]["mean"], entry["accuracy"]["std"], entry["paper"], entry["seconds"]
        (52.0, 2.8284, 45.8, 1.0)
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["method"], row["dataset"], row["shots"]), []).append(row)
    summary = []
    for (protocol, method, dataset, shots), members in groups.items():
        entry = {"protocol": protocol, "method": method, "dataset": dataset, "shots": shots}
        for metric in _metrics(protocol):
            entry[metric] = _stats([member[metric] for member in members])
        entry["seconds"] = round(statistics.fmean(member["seconds"] for member in members), 4)
        entry["paper"] = paper_number(method, dataset, shots) if protocol == "few-shot" else None
        if protocol == "base2novel":
            entry["novel_is_zero_shot"] = any(member["novel_is_zero_shot"] for member in members)
        if protocol == "cross-domain":
            entry["source"] = members[0]["source"]
        summary.append(entry)
    return summary


def _text(stats: dict[str, Any], paper: Optional[float] = None) -> str:
    ours = "—" if stats["mean"] is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    return ours if paper is None else f"{ours} ({paper:.2f})"


def render_markdown(summary: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Tables per protocol: a row per method and dataset, a column per shots; then seconds and published averages."""
    from peft_clip_adapter.fewshot.baselines.methods import METHODS

    lines = [
        "# Few-shot baselines on one protocol",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"Model: `{settings['model']}`; seeds {settings['seeds']}. Top-1 accuracy (%) on each test split, mean ± std "
        "over seeds; where a paper reports the cell, its number is in brackets (CLIP-Adapter and zero-shot CLIP, "
        "RN50). Hyperparameters are chosen without the test split (see `results.json`).",
    ]
    order = {name: index for index, name in enumerate(METHODS)}
    shots = sorted({entry["shots"] for entry in summary})
    for protocol in PROTOCOLS:
        entries = sorted(
            (entry for entry in summary if entry["protocol"] == protocol),
            key=lambda entry: (entry["dataset"], order[entry["method"]], entry["shots"]),
        )
        if not entries:
            continue
        by_cell = {(entry["method"], entry["dataset"], entry["shots"]): entry for entry in entries}
        pairs = list(dict.fromkeys((entry["method"], entry["dataset"]) for entry in entries))
        for metric in _metrics(protocol):
            title = f"## {protocol}" + ("" if metric == "accuracy" else f": {metric}")
            headers = ["method", "dataset", *[f"{k} shot{'s' if k > 1 else ''}" for k in shots]]
            table = []
            for method, dataset in pairs:
                cells = [by_cell.get((method, dataset, k)) for k in shots]
                label = method
                if metric == "novel" and any(cell and cell["novel_is_zero_shot"] for cell in cells):
                    label += " (zero-shot: cannot classify unseen classes)"
                texts = ["—" if cell is None else _text(cell[metric], cell["paper"]) for cell in cells]
                source = next((cell["source"] for cell in cells if cell and "source" in cell), None)
                table.append([label, dataset if source is None else f"{source} → {dataset}", *texts])
            lines += ["", title, "", markdown_table(headers, table)]
    lines += ["", "## Seconds per cell (training + selection, not the shared extraction)", ""]
    methods = sorted({entry["method"] for entry in summary}, key=order.get)
    cost = [[method, *[_mean_seconds(summary, method, k) for k in shots]] for method in methods]
    lines.append(markdown_table(["method", *[f"{k} shot{'s' if k > 1 else ''}" for k in shots]], cost))
    lines += ["", "## Published 16-shot averages over the 11 datasets", ""]
    lines.append(
        markdown_table(
            ["backbone", "method", "average (%)"], [list(map(str, row)) for row in PUBLISHED_16_SHOT_AVERAGES]
        )
    )  # noqa: E501
    if settings.get("smoke"):
        lines += [
            "",
            "Smoke run: a tiny random CLIP on generated images; these numbers only show that the harness runs.",
        ]
    return "\n".join(lines) + "\n"


def _mean_seconds(summary: list[dict[str, Any]], method: str, shots: int) -> str:
    values = [entry["seconds"] for entry in summary if entry["method"] == method and entry["shots"] == shots]
    return f"{statistics.fmean(values):.2f}" if values else "—"


def save_plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (base-to-novel: hm) against shots, a line per method, a panel per protocol and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = list(dict.fromkeys((entry["protocol"], entry["dataset"]) for entry in summary))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    for axis, (protocol, dataset) in zip(axes.flat, panels, strict=False):
        metric = "hm" if protocol == "base2novel" else "accuracy"
        entries = [entry for entry in summary if (entry["protocol"], entry["dataset"]) == (protocol, dataset)]
        for method in dict.fromkeys(entry["method"] for entry in entries):
            points = sorted((entry["shots"], entry[metric]) for entry in entries if entry["method"] == method)
            shots = [k for k, _ in points]
            axis.errorbar(shots, [s["mean"] for _, s in points], yerr=[s["std"] for _, s in points], marker="o",
                          capsize=2, label=method)  # fmt: skip
        axis.set(title=f"{dataset} ({protocol}{', hm' if metric == 'hm' else ''})", xscale="log",
                 xlabel="shots per class", ylabel="accuracy (%)")  # fmt: skip
        ticks = sorted({entry["shots"] for entry in entries})
        axis.set_xticks(ticks, [str(k) for k in ticks])
        axis.legend(fontsize="x-small")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# Main


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every cell, write ``results.json`` / ``.md`` / ``.png`` and ``timing.json``; return the report."""
    from peft_clip_adapter.atomic import write_text

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    args = parse_args(argv)
    if "lora" in args.methods:  # a model LoRA cannot adapt is refused before any extraction
        from peft_clip_adapter.fewshot.baselines.methods import check_lora_model

        check_lora_model(args.model_name_or_path)
    extractor = Extractor(args.model_name_or_path, Path(args.output_dir) / "feature-cache", RECIPES[args.recipe][3])
    rows = []
    for protocol in args.protocols:
        for entry in args.datasets:
            rows += run_dataset(entry, args, extractor, protocol)
    summary = summarise(rows)
    command = " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    model = args.model_name_or_path
    if os.path.isdir(model):  # a local folder's full path means nothing elsewhere
        model = f"{Path(model).name} (local folder)"
    settings = {"command": command, "model": model, "seeds": args.seeds, "smoke": args.smoke}
    markdown = render_markdown(summary, settings)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "results.json", json.dumps(rows, indent=1))
    write_text(output / "results.md", markdown)
    save_plot(summary, output / "results.png")
    methods = {
        method: round(sum(row["seconds"] for row in rows if row["method"] == method), 2) for method in args.methods
    }  # noqa: E501
    timing = {
        "command": command,
        "total_seconds": round(time.perf_counter() - start, 2),
        "extraction_seconds": round(extractor.seconds, 2),
        "method_seconds": methods,
        "cells": len({(row["protocol"], row["dataset"], row["shots"], row["seed"]) for row in rows}),
        "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version()},
    }
    write_text(output / "timing.json", json.dumps(timing, indent=1))
    print(markdown)
    return {"rows": rows, "summary": summary, "timing": timing}


def cli(argv: Optional[list[str]] = None) -> None:
    """``main``, with a user error (bad input, a missing file) as one ``error:`` line on stderr and exit code 2."""
    try:
        main(argv)
    except (ValueError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
