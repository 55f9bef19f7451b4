"""The paper's few-shot table in one command: CLIP-Adapter over datasets x shots x seeds, beside the reported numbers.

    python benchmarks/reproduce.py --model_name_or_path openai/clip-vit-base-patch16 --data_root data
    python benchmarks/reproduce.py --model_name_or_path ... --data_root data --datasets eurosat,dtd \\
        --shots 1,16 --seeds 1,2,3 --hparams search --num_train_epochs 200     # unknown flags go to the trainer
    python benchmarks/reproduce.py --model_name_or_path ... --datasets eurosat --dataset_hub eurosat=<hub id>
    python benchmarks/reproduce.py --smoke     # offline: tiny CLIP + generated images, end to end in a minute

Each cell (dataset, shots, seed) is one run of the command ``python examples/fewshot.py``: ``shots``
images per class sampled with ``seed`` from ``<data_root>/<folder>/train``, accuracy on
``<data_root>/<folder>/test`` (layout and sources in ``paper.py``). A dataset given as a Hub id
(``--dataset_hub KEY=ID[:CONFIG]``) is exported once to that layout under ``--output_dir`` (its ``train``
split and ``--hub_test_split``), then read the same way. The test split is only ever used
for the final accuracy. The ratio (alpha) is chosen without it, by ``--hparams``:

- ``fixed`` (default): the paper's default, ``--ratio`` (0.2), for every dataset.
- ``search``: the trainer's ``--ratio auto`` over ``--search_ratios``: k-fold cross-validation on the
  training shots themselves (``peft_clip_adapter.fewshot.search``: every candidate and fold trained at once on the
  cached features), then the final adapter trains on all ``k`` shots with the winner. With 1 shot there
  is nothing to hold out, so the trainer falls back to the paper's ratio, 0.2. Each cell records the
  strategy and every candidate's held-out accuracy.

Outputs in ``--output_dir``: ``reproduce.md`` (ours as mean +- std over seeds, the paper's in brackets,
zero-shot beside), ``reproduce.json`` (every cell), ``reproduce.png`` (accuracy vs shots per dataset) and
``runs/`` (each cell's trainer output; a cell whose folder holds a finished run with the same arguments
is reused, so an interrupted sweep resumes; ``--rerun`` recomputes).

The paper used an RN50 CLIP; transformers hosts the ViT CLIPs (ViT-B/16 is the usual choice), which
are stronger, so expect numbers above the RN50 column. Real numbers need real weights and data;
``--smoke`` only shows that the harness runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from benchlib import markdown_table, write_results
from paper import DATASETS, SHOTS, SMOKE_DATASET, PaperDataset, export_hub_dataset, parse_dataset_keys

logger = logging.getLogger("reproduce")

TRAINER = Path(__file__).resolve().parents[1] / "examples" / "fewshot.py"
CELL_FILE = "reproduce_cell.json"
RESULTS_FILE = "all_results.json"
#: Smoke settings: small enough for a test, large enough that every code path runs.
SMOKE_TRAINER_ARGS = ["--num_train_epochs", "10", "--views", "2", "--learning_rate", "0.05"]


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


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest (passed on to the trainer, e.g. ``--num_train_epochs 50 --cpu``).

    Raises:
        ValueError: for a bad list, an unknown dataset, a missing ``--model_name_or_path`` /
            ``--data_root`` (outside ``--smoke``), or a malformed ``--dataset_dir`` / ``--dataset_hub``.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        # parse_known_args: without this line --help would not say where the other flags go.
        epilog="Flags not listed here go to examples/fewshot.py (e.g. --num_train_epochs 50 --cpu); see its --help.",
    )
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
    parser.add_argument("--datasets", default="all", help=f"'all' or comma-separated keys of {list(DATASETS)}.")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="Shots per class, comma-separated.")
    parser.add_argument("--seeds", default="1,2,3", help="Seeds (few-shot sample and training), comma-separated.")
    parser.add_argument("--hparams", choices=["fixed", "search"], default="fixed", help="How the ratio is chosen.")
    parser.add_argument("--ratio", type=float, default=0.2, help="The fixed ratio (paper: 0.2).")
    parser.add_argument("--search_ratios", default="0.2,0.4,0.6,0.8", help="Candidates of --hparams search.")
    parser.add_argument("--output_dir", default="reproduce-output", help="Where tables, plot and runs go.")
    parser.add_argument("--rerun", action="store_true", help="Recompute cells that already have results.")
    parser.add_argument("--smoke", action="store_true", help="Offline end-to-end run on tiny generated data.")
    args, trainer_args = parser.parse_known_args(argv)
    args.shots = _int_list(args.shots, "--shots")
    args.seeds = _int_list(args.seeds, "--seeds", minimum=0)
    args.search_ratios = _ratio_list(args.search_ratios)
    if not 0.0 <= args.ratio <= 1.0:
        raise ValueError(f"--ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got {args.ratio}.")
    if args.smoke:
        return args, _smoke_setup(args, trainer_args)
    args.datasets = [DATASETS[key] for key in parse_dataset_keys(args.datasets)]
    args.dataset_dirs = _dataset_dirs(args)
    if args.model_name_or_path is None:
        raise ValueError(
            "Pass --model_name_or_path (e.g. openai/clip-vit-base-patch16), or --smoke for the offline run."
        )
    return args, trainer_args


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
    # Hub datasets are exported to the same layout under output_dir (see run_cells).
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


def _smoke_setup(args: argparse.Namespace, trainer_args: list[str]) -> list[str]:
    """Tiny CLIP and a generated train / test image folder under ``output_dir``; small trainer settings."""
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
    return [*SMOKE_TRAINER_ARGS, *trainer_args]


def run_trainer(argv: list[str], output_dir: Path, rerun: bool) -> dict[str, Any]:
    """Results of ``examples/fewshot.py`` on ``argv``, run as a command: reused from ``output_dir`` if it ran
    with the same ``argv``."""
    cell_file, results_file = output_dir / CELL_FILE, output_dir / RESULTS_FILE
    finished = not rerun and cell_file.is_file() and results_file.is_file()
    if finished and json.loads(cell_file.read_text()) == argv:
        logger.info("reusing %s", output_dir)
        return json.loads(results_file.read_text())
    logger.info("fewshot.py %s", " ".join(argv))
    command = [sys.executable, str(TRAINER), *argv, "--output_dir", str(output_dir), "--overwrite_output_dir"]
    code = subprocess.run(command).returncode  # its log and any `error:` line go straight to ours
    if code != 0:
        raise RuntimeError(
            f"examples/fewshot.py exited with code {code} on the cell {output_dir} (its error is above)."
        )
    cell_file.write_text(json.dumps(argv))
    return json.loads(results_file.read_text())


def hparams_argv(args: argparse.Namespace) -> list[str]:
    """The trainer's flags that choose the ratio as ``--hparams`` says (the search is the trainer's own).

    Example:
        >>> hparams_argv(argparse.Namespace(hparams="search", ratio=0.2, search_ratios=[0.2, 0.6]))
        ['--ratio', 'auto', '--ratio_grid', '0.2', '0.6']
    """
    if args.hparams == "fixed":
        return ["--ratio", str(args.ratio)]
    return ["--ratio", "auto", "--ratio_grid", *(str(ratio) for ratio in args.search_ratios)]


def ratio_choice(results: dict[str, Any]) -> dict[str, Any]:
    """How a cell's ratio was chosen, from the trainer's results: the ratio, the strategy and the scores.

    Example:
        >>> ratio_choice({"ratio": 0.2, "hyperparameter_search": None})
        {'ratio': 0.2, 'strategy': 'fixed'}
    """
    search = results.get("hyperparameter_search")
    choice = {"ratio": results["ratio"], "strategy": search["strategy"] if search else "fixed"}
    if search and search["candidates"]:
        # JSON keys are strings.
        choice["held_out_accuracy"] = {str(c["ratio"]): c["validation_accuracy"] for c in search["candidates"]}
    return choice


def run_cells(args: argparse.Namespace, trainer_args: list[str]) -> list[dict[str, Any]]:
    """Every (dataset, shots, seed) cell: choose the ratio, train on the shots, test on the test split."""
    runs = Path(args.output_dir) / "runs"
    cells = []
    for entry in args.datasets:
        folder = args.dataset_dirs[entry.key]
        if entry.key in args.hub_datasets:
            dataset_id, config_name = args.hub_datasets[entry.key]
            counts = export_hub_dataset(dataset_id, folder, config_name=config_name, test_split=args.hub_test_split)
            logger.info("%s: %s exported to %s (%s)", entry.name, dataset_id, folder, counts)
        for split in ("train", "test"):
            if not (folder / split).is_dir():
                raise ValueError(f"{folder / split} is missing: {entry.name} must be laid out as in paper.py.")
        base_argv = ["--model_name_or_path", args.model_name_or_path, "--templates", entry.template]
        base_argv += ["--feature_cache_dir", str(Path(args.output_dir) / "feature-cache"), *trainer_args]
        for shots in args.shots:
            for seed in args.seeds:
                workdir = runs / entry.key / f"{shots}-shot" / f"seed-{seed}"
                argv = [*base_argv, "--train_dir", str(folder / "train"), "--validation_dir", str(folder / "test")]
                argv += ["--shots", str(shots), "--seed", str(seed), *hparams_argv(args)]
                results = run_trainer(argv, workdir / "final", args.rerun)
                cells.append(
                    {
                        "dataset": entry.key,
                        "shots": shots,
                        "seed": seed,
                        "accuracy": 100.0 * results["eval_accuracy"],
                        "zero_shot_accuracy": 100.0 * results["zero_shot_accuracy"],
                        **ratio_choice(results),
                    }
                )
    return cells


def summarise(cells: list[dict[str, Any]], datasets: list[PaperDataset], shots: list[int]) -> dict[str, Any]:
    """Mean and std (over seeds) of ours per dataset and shots, with zero-shot and the paper's numbers.

    Example:
        >>> cells = [{"dataset": "dtd", "shots": 1, "seed": s, "accuracy": a, "zero_shot_accuracy": 40.0}
        ...          for s, a in ((1, 50.0), (2, 54.0))]
        >>> row = summarise(cells, [DATASETS["dtd"]], [1])["dtd"]
        >>> row["shots"][1]["mean"], row["shots"][1]["std"], row["shots"][1]["paper"], row["zero_shot"]["paper"]
        (52.0, 2.8284, 45.8, 42.2)
    """
    summary = {}
    for entry in datasets:
        mine = [cell for cell in cells if cell["dataset"] == entry.key]
        zero_shot = [cell["zero_shot_accuracy"] for cell in mine]
        row = {"name": entry.name, "zero_shot": {**_stats(zero_shot), "paper": entry.zero_shot}, "shots": {}}
        for k in shots:
            values = [cell["accuracy"] for cell in mine if cell["shots"] == k]
            row["shots"][k] = {**_stats(values), "paper": entry.paper_accuracy(k)}
        summary[entry.key] = row
    return summary


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std over seeds
    return {"mean": round(statistics.fmean(values), 4), "std": round(spread, 4), "n": len(values)}


def _cell_text(stats: dict[str, Any]) -> str:
    ours = "—" if stats["mean"] is None else f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    paper = "—" if stats["paper"] is None else f"{stats['paper']:.2f}"
    return f"{ours} ({paper})"


def render_markdown(summary: dict[str, Any], shots: list[int], settings: dict[str, Any]) -> str:
    """The table: a row per dataset (and their mean), ours ± std over seeds with the paper's in brackets."""
    headers = ["dataset", "zero-shot", *[f"{k} shot{'s' if k > 1 else ''}" for k in shots]]
    rows = [
        [row["name"], _cell_text(row["zero_shot"]), *[_cell_text(row["shots"][k]) for k in shots]]
        for row in summary.values()
    ]
    if len(summary) > 1:
        mean_row = ["mean", _cell_text(_mean_of(summary, lambda row: row["zero_shot"]))]
        mean_row += [_cell_text(_mean_of(summary, lambda row, k=k: row["shots"][k])) for k in shots]
        rows.append(mean_row)
    lines = [
        "# CLIP-Adapter: our accuracy beside the paper's",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"Model: `{settings['model']}`; seeds {settings['seeds']}; ratio chosen by `{settings['hparams']}`. "
        "Top-1 accuracy (%) on each dataset's test split: ours as mean ± std over seeds, the paper's "
        "(RN50 backbone) in brackets. The mean row averages the datasets' means and standard deviations.",
        "",
        markdown_table(headers, rows),
    ]
    if settings.get("smoke"):
        lines += [
            "",
            "Smoke run: a tiny random CLIP on generated images, so these numbers only show that the harness "
            "runs end to end. Real numbers need real CLIP weights and the real datasets.",
        ]
    return "\n".join(lines)


def _mean_of(summary: dict[str, Any], pick) -> dict[str, Any]:
    """Mean over datasets of ours and of the paper's (each over the datasets that have a number)."""
    entries = [pick(row) for row in summary.values()]
    ours = [entry["mean"] for entry in entries if entry["mean"] is not None]
    paper = [entry["paper"] for entry in entries if entry["paper"] is not None]
    stds = [entry["std"] for entry in entries if entry["std"] is not None]
    return {
        "mean": statistics.fmean(ours) if ours else None,
        "std": statistics.fmean(stds) if stds else 0.0,
        "paper": statistics.fmean(paper) if len(paper) == len(entries) else None,
    }


def save_plot(summary: dict[str, Any], shots: list[int], path: Path) -> None:
    """Accuracy vs shots, one panel per dataset: ours (mean ± std), the paper's, and both zero-shots."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = min(4, len(summary))
    rows = math.ceil(len(summary) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, row in zip(axes.flat, summary.values(), strict=False):
        means = [row["shots"][k]["mean"] for k in shots]
        stds = [row["shots"][k]["std"] for k in shots]
        axis.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label="ours")
        paper = [(k, row["shots"][k]["paper"]) for k in shots if row["shots"][k]["paper"] is not None]
        if paper:
            axis.plot(
                [k for k, _ in paper], [value for _, value in paper], marker="s", linestyle="--", label="paper (RN50)"
            )
        axis.axhline(row["zero_shot"]["mean"], color="gray", linestyle=":", label="zero-shot (ours)")
        axis.set(title=row["name"], xscale="log", xlabel="shots per class", ylabel="accuracy (%)")
        axis.set_xticks(shots, [str(k) for k in shots])
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(summary) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the sweep, print the table, write ``reproduce.md`` / ``.json`` / ``.png``; return the report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args, trainer_args = parse_args(argv)
    cells = run_cells(args, trainer_args)
    summary = summarise(cells, args.datasets, args.shots)
    settings = {
        "command": " ".join(["python benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model_name_or_path,
        "seeds": args.seeds,
        "hparams": args.hparams,
        "smoke": args.smoke,
        "trainer_args": trainer_args,
    }
    markdown = render_markdown(summary, args.shots, settings)
    report = {"settings": settings, "summary": summary, "cells": cells}
    write_results(report, markdown, args.output_dir, "reproduce")
    save_plot(summary, args.shots, Path(args.output_dir) / "reproduce.png")
    print(markdown)
    return report


if __name__ == "__main__":
    main()
