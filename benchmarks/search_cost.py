"""What ``--ratio auto`` costs: the k-fold search against one fixed-ratio training run, in the same run.

    python benchmarks/search_cost.py                 # both workloads, 3 repeats (what results/ holds)
    python benchmarks/search_cost.py --tiny          # seconds: 5 epochs, 1 repeat (the smoke test)

Each workload runs the command ``python examples/fewshot.py`` on cached features, taking
turns: ``--ratio 0.2`` (one fixed-ratio training run: its ``train_seconds``) and ``--ratio auto`` (the
search: ``hyperparameter_search.seconds``; then a final fit, again ``train_seconds``), and ``--ratio auto
--learning_rate auto``. Features are extracted once before timing, so only training is compared. The
ratio ``search / fixed`` is the price of choosing the ratio without the test set, in units of one training
run; every number is the median over ``--repeats`` turns.

Workloads (200 epochs, the paper's recipe, 16 shots of the 9 colour-shape pairs of
``peft_clip_adapter.testing.scene_tasks``):

- ``micro-clip``: the offline default's pretrained micro-CLIP (width d = 64).
- ``vit-b-width``: the same images through a random tiny CLIP whose projection is ViT-B's width d = 512
  (the adapter and the cached features have real size; training time does not depend on the weights).

Results go to ``benchmarks/results/search_cost_cpu.json`` and ``.md`` (``search_cost_cpu_tiny`` with
``--tiny``), with the machine's description and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import benchlib

logger = logging.getLogger("search_cost")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Runs timed in turns: name -> trainer flags.
VARIANTS = {
    "fixed": ["--ratio", "0.2"],
    "ratio_auto": ["--ratio", "auto"],
    "ratio_and_lr_auto": ["--ratio", "auto", "--learning_rate", "auto"],
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed turns of every variant (median reported).")
    parser.add_argument("--num_train_epochs", type=int, default=200, help="Epochs of every run (paper: 200).")
    parser.add_argument(
        "--workloads", default="micro-clip,vit-b-width", help="Comma-separated: micro-clip, vit-b-width."
    )
    parser.add_argument("--tiny", action="store_true", help="5 epochs, 1 repeat, vit-b-width only: seconds.")
    parser.add_argument("--work_dir", default=None, help="Models, images and feature caches (default: a temp folder).")
    parser.add_argument("--output_dir", default=str(RESULTS_DIR), help="Where the .json and .md results go.")
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats, args.num_train_epochs, args.workloads = 1, 5, "vit-b-width"
    args.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(args.workloads) - {"micro-clip", "vit-b-width"})
    if unknown or not args.workloads:
        raise ValueError(f"--workloads must name micro-clip and/or vit-b-width, got {unknown or args.workloads}.")
    if args.repeats < 1 or args.num_train_epochs < 1:
        raise ValueError(
            f"--repeats and --num_train_epochs must be >= 1, got {args.repeats}, {args.num_train_epochs}."
        )
    return args


def run_trainer(argv: list[str]) -> dict[str, Any]:
    """The results (``all_results.json``) of ``examples/fewshot.py`` on ``argv``, run as a command."""
    finished = subprocess.run([sys.executable, str(ROOT / "examples" / "fewshot.py"), *argv])
    if finished.returncode != 0:
        raise RuntimeError(f"examples/fewshot.py exited with code {finished.returncode} (its error is above).")
    return json.loads((Path(argv[argv.index("--output_dir") + 1]) / "all_results.json").read_text())


def prepare_workload(name: str, work_dir: Path) -> list[str]:
    """Model and data flags of a workload, building what it needs once under ``work_dir``."""
    from peft_clip_adapter.testing.offline_default import build_offline_default
    from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS, write_task_dataset
    from peft_clip_adapter.testing.scenes import vocabulary
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    if name == "micro-clip":
        model, train, validation = build_offline_default(work_dir / "cache", "dusk-pairs")
    else:
        model = work_dir / "vit-b-width-clip"
        if not model.is_dir():
            build_tiny_clip(model, words=vocabulary(), projection_dim=512, hidden_size=64)
        task = SCENE_TASKS["dusk-pairs"]
        train, validation = work_dir / "pairs-train", work_dir / "pairs-validation"
        for folder, count, seed in ((train, 16, 0), (validation, 10, 1)):
            if not folder.is_dir():
                write_task_dataset(folder, task, images_per_class=count, seed=seed)
    return ["--model_name_or_path", str(model), "--train_dir", str(train), "--validation_dir", str(validation)]


def measure(base_argv: list[str], args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Median seconds of training (and searching) per variant, taking turns, on features cached beforehand."""
    results: dict[str, dict[str, Any]] = {}

    def run(name: str) -> None:
        argv = [*base_argv, *VARIANTS[name], "--output_dir", str(work_dir / "runs" / name), "--overwrite_output_dir"]
        results[name] = run_trainer(argv)

    run("ratio_auto")  # extracts and caches every feature the runs need (training views, eval views)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for turn in range(args.repeats):
        for name in list(VARIANTS) if turn % 2 == 0 else list(reversed(VARIANTS)):
            run(name)
            search = results[name]["hyperparameter_search"]
            times[name].append(
                {"train_s": results[name]["train_seconds"], "search_s": search["seconds"] if search else 0.0}
            )
    fixed = statistics.median(t["train_s"] for t in times["fixed"])
    shape = results["fixed"]
    summary: dict[str, Any] = {
        "fixed_train_s": fixed,
        "shape": {
            "classes": shape["num_classes"],
            "train_images": shape["num_train_images"],
            "views": shape["views"],
            "epochs": args.num_train_epochs,
        },
    }
    for name in ("ratio_auto", "ratio_and_lr_auto"):
        search = results[name]["hyperparameter_search"]
        searched = statistics.median(t["search_s"] for t in times[name])
        total = statistics.median(t["search_s"] + t["train_s"] for t in times[name])
        summary[name] = {
            "adapters": len(search["candidates"]) * search["num_folds"],  # candidates x folds, trained together
            "search_s": searched,
            "search_over_fixed": benchlib.ratio(searched, fixed),
            "total_over_fixed": benchlib.ratio(total, fixed),
        }
    return {"summary": summary, "times": times}


def render_markdown(report: dict[str, Any]) -> str:
    """The results table: per workload, one fixed run's training time and the searches' cost ratios."""
    headers = [
        "workload",
        "d",
        "classes x shots, views",
        "fixed run (s)",
        "ratio auto: adapters",
        "search (s)",
        "search / fixed",
        "(search + final) / fixed",
        "ratio + lr auto: adapters",
        "search / fixed ",
    ]
    rows = []
    for name, result in report["workloads"].items():
        summary = result["summary"]
        shape = summary["shape"]
        rows.append(
            [
                name,
                result["width"],
                f"{shape['classes']} x {shape['train_images'] // shape['classes']}, {shape['views']}",
                f"{summary['fixed_train_s']:.2f}",
                summary["ratio_auto"]["adapters"],
                f"{summary['ratio_auto']['search_s']:.2f}",
                f"{summary['ratio_auto']['search_over_fixed']:.2f}",
                f"{summary['ratio_auto']['total_over_fixed']:.2f}",
                summary["ratio_and_lr_auto"]["adapters"],
                f"{summary['ratio_and_lr_auto']['search_over_fixed']:.2f}",
            ]
        )
    machine = report["machine"]
    return "\n".join(
        [
            "# Cost of `--ratio auto`",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, load average "
            f"{machine['load_average_1m_5m_15m']} at the start and {machine['load_average_at_end']} at the end; "
            f"torch {machine['torch']}. "
            f"{report['epochs']} epochs, medians of {report['repeats']} turns. "
            "Times are training on cached features only (extraction happened before timing). "
            "`search / fixed`: the k-fold search's time over one fixed-ratio training run of the same trainer.",
            "",
            benchlib.markdown_table(headers, rows),
        ]
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Measure every workload, print the table, write ``search_cost_cpu[_tiny].json`` / ``.md``."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(args.work_dir or scratch)
        report: dict[str, Any] = {
            "command": " ".join(["python benchmarks/search_cost.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": benchlib.machine_description("cpu"),
            "epochs": args.num_train_epochs,
            "repeats": args.repeats,
            "workloads": {},
        }
        for name in args.workloads:
            folder = work_dir / name
            base = [*prepare_workload(name, folder), "--num_train_epochs", str(args.num_train_epochs)]
            base += ["--feature_cache_dir", str(folder / "features"), "--cpu"]
            result = measure(base, args, folder)
            result["width"] = 64 if name == "micro-clip" else 512
            report["workloads"][name] = result
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    markdown = render_markdown(report)
    benchlib.write_results(
        report, markdown, args.output_dir, "search_cost_cpu_tiny" if args.tiny else "search_cost_cpu"
    )
    print(markdown)
    return report


if __name__ == "__main__":
    main()
