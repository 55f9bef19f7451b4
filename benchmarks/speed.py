"""Speed and memory of CLIP-Adapter: inference overhead, time to a trained adapter, LoRA, full fine-tuning.

    python benchmarks/speed.py                                # CPU, ViT-B/32 and ViT-B/16, paper settings
    python benchmarks/speed.py --arch vit-b-32 --views 2      # a shorter CPU run (what results/ holds)
    python benchmarks/speed.py --device cuda                  # 16 shots x 1000 classes on a GPU
    python benchmarks/speed.py --tiny                         # the tiny CLIP, seconds (the smoke test)
    python benchmarks/speed.py --sections pipeline            # the input pipeline only (a few minutes on CPU)
    bash benchmarks/gpu.sh                                    # the GPU run: ViT-B/16 bf16, 16k JPEGs, < 8 min planned

Every comparison is a ratio of two timings taken in this run (medians after warm-up, calls taking
turns), on real-size ViT-B/32 and ViT-B/16 CLIP models built from ``CLIPConfig`` with random weights
(speed does not depend on the weights) at 224 px. Sections:

1. ``overhead``: ``CLIPModel.forward`` and ``get_image_features`` with the adapter vs the bare model.
2. ``adapter``: time to a trained adapter (``shots`` x ``classes`` images, ``epochs`` epochs): the
   reference recipe (frozen backbone and text tower re-run on every step; a few steps are timed and
   extrapolated), ours (feature extraction over all views + training on the cached features, timed in
   full) and the floor (one bare forward pass over the same images x views).
3. ``alternatives``: PEFT LoRA (r=8, vision q/v) and full fine-tuning of the vision tower, per epoch.
4. ``memory``: peak memory of training on cached features vs one inference pass, the alternatives' peak
   memory, and the adapter's size on disk.
5. ``pipeline``: the input pipeline of feature extraction (``pipeline_bench.py``): CPU ms per training
   view and per eval image at 500x375 and 12 MP, before and now, and extraction images/s with a tiny
   224-px backbone at 0, 1 and 2 DataLoader workers (views made on the CPU, and on a GPU on the device).

Results go to ``benchmarks/results/speed_<device>.json`` and ``.md`` (``speed_<device>_pipeline`` when
only the pipeline section runs, ``_tiny`` with ``--tiny``), with the machine's description and exactly
what was measured and what extrapolated.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import benchlib
import pipeline_bench
import torch
import workloads
from speed_report import TARGETS, render_markdown
from torch.nn import functional as F

from peft_clip_adapter import adapter_layers

logger = logging.getLogger("speed")

SECTIONS = ("overhead", "adapter", "alternatives", "memory", "pipeline")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu).")
    parser.add_argument("--tiny", action="store_true", help="Use the tiny offline CLIP and tiny sizes (seconds).")
    parser.add_argument("--arch", default="vit-b-32,vit-b-16", help="Comma-separated: vit-b-32, vit-b-16.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {SECTIONS}.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass / step (paper: 32).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed warm-up rounds before each timing.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds of the overhead section (median).")
    parser.add_argument("--shots", type=int, default=16, help="Training images per class.")
    parser.add_argument("--classes", type=int, default=None, help="Classes (default: 10 on CPU, 1000 on GPU).")
    parser.add_argument("--views", type=int, default=10, help="Augmented views per image in the feature cache.")
    parser.add_argument("--epochs", type=int, default=200, help="Training epochs (paper: 200).")
    parser.add_argument("--reference_steps", type=int, default=3, help="Timed steps of the reference recipe.")
    parser.add_argument("--alternative_steps", type=int, default=2, help="Timed steps of LoRA / full fine-tuning.")
    parser.add_argument(
        "--image_size", default="256", help="Generated training images: a side (256) or WIDTHxHEIGHT (500x375)."
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="Backbone dtype of overhead and adapter."
    )
    parser.add_argument(
        "--extraction_batch_size",
        type=int,
        default=None,
        help="Images per backbone pass when extracting (adapter section, ours and the floor; default: --batch_size).",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader workers of the adapter section's extraction (default: the library's, for the device).",
    )
    parser.add_argument(
        "--pipeline_images",
        type=int,
        default=384,
        help="500x375 JPEGs of the throughput runs (workers start in ~0.1 s).",
    )
    parser.add_argument("--pipeline_workers", default="0,1,2", help="Worker counts of the throughput runs.")
    parser.add_argument("--pipeline_batch_size", type=int, default=32, help="Batch of the throughput runs.")
    parser.add_argument("--pipeline_repeats", type=int, default=3, help="Timed rounds of the pipeline section.")
    parser.add_argument("--output_dir", default=None, help=f"Where to write results (default: {RESULTS_DIR}).")
    args = parser.parse_args(argv)
    _validate(args)
    return args


def _validate(args: argparse.Namespace) -> None:
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:index]', got {args.device!r}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but torch sees no CUDA device; use --device cpu.")
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if not sections or any(name not in SECTIONS for name in sections):
        raise ValueError(f"--sections must list names from {list(SECTIONS)}, got {args.sections!r}.")
    args.sections = sections
    counts = ("batch_size", "repeats", "shots", "views", "epochs", "reference_steps", "alternative_steps")
    counts += ("pipeline_images", "pipeline_batch_size", "pipeline_repeats")
    for name in counts:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.extraction_batch_size is not None and args.extraction_batch_size < 1:
        raise ValueError(f"--extraction_batch_size must be >= 1, got {args.extraction_batch_size}.")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}.")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0 (0 decodes in the main process), got {args.num_workers}.")
    if args.classes is not None and args.classes < 2:
        raise ValueError(f"--classes must be >= 2 (a classifier needs two classes), got {args.classes}.")
    args.image_size = _image_size(args.image_size)
    args.pipeline_workers = _worker_counts(args.pipeline_workers)
    if args.dtype != "float32" and {"alternatives", "memory"} & set(sections):
        raise ValueError(
            f"--dtype {args.dtype} applies to the overhead, adapter and pipeline sections; alternatives and memory "
            "run in float32. Run them separately."
        )
    args.extraction_batch_size = args.extraction_batch_size or args.batch_size
    if args.tiny:
        # Tiny sizes: every section runs in seconds; the numbers only show that the code works.
        args.classes = args.classes or 4
        args.shots, args.views, args.epochs = min(args.shots, 4), min(args.views, 2), min(args.epochs, 5)
        args.batch_size, args.repeats = min(args.batch_size, 8), min(args.repeats, 2)
        args.extraction_batch_size = min(args.extraction_batch_size, 8)
        args.reference_steps, args.alternative_steps, args.image_size = 1, 1, (48, 48)
        args.pipeline_images, args.pipeline_repeats = min(args.pipeline_images, 8), 1
    else:
        args.architectures = benchlib.parse_architectures(args.arch)
    args.classes = args.classes or (1000 if args.device.startswith("cuda") else 10)


def _image_size(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"500x375"`` -> (500, 375): width and height of the generated images."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(part.isdigit() for part in parts):
        width, height = int(parts[0]), int(parts[-1])
        if min(width, height) >= 32:
            return width, height
    raise ValueError(f"--image_size must be a side or WIDTHxHEIGHT, each >= 32 pixels, got {text!r}.")


def _worker_counts(text: str) -> list[int]:
    counts = [part.strip() for part in text.split(",") if part.strip()]
    if not counts or not all(part.isdigit() for part in counts):
        raise ValueError(f"--pipeline_workers must be comma-separated whole numbers >= 0, got {text!r}.")
    return sorted({int(part) for part in counts})


# ---------------------------------------------------------------------------------------------------
# 1. Inference overhead


def measure_overhead(source: str, args: argparse.Namespace) -> dict[str, Any]:
    """``forward`` and ``get_image_features`` of the bare ``CLIPModel`` vs the same weights with an adapter.

    Besides the end-to-end ratio (noisy on a shared machine), the adapter alone is timed on the pooled
    embeddings of the batch: ``(bare + adapter) / bare`` is the overhead free of the backbone's jitter.
    """
    device, batch, dtype = args.device, args.batch_size, DTYPES[args.dtype]
    bare = benchlib.build_clip(source).to(device, dtype)
    adapted = workloads.clip_adapter(copy.deepcopy(bare))
    size = bare.config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    prompt_ids = benchlib.reference_prompt_ids(bare.config.text_config, args.classes).to(device)  # [C, L]

    def forward(model):
        return lambda: model(input_ids=prompt_ids, pixel_values=pixel_values)

    def image_features(model):
        return lambda: model.get_image_features(pixel_values=pixel_values)

    results: dict[str, Any] = {"batch_size": batch, "num_prompts": args.classes}
    with torch.no_grad():
        for name, call in (("forward", forward), ("get_image_features", image_features)):
            timings = benchlib.interleaved_medians(
                {"bare": call(bare), "adapter": call(adapted)}, warmup=args.warmup, repeats=args.repeats, device=device
            )
            results[name] = {
                "bare_s": timings["bare"]["median_s"],
                "adapter_s": timings["adapter"]["median_s"],
                "ratio": benchlib.ratio(timings["adapter"]["median_s"], timings["bare"]["median_s"]),
                "times_s": {key: value["times_s"] for key, value in timings.items()},
            }
        embeddings = image_features(bare)().pooler_output  # [B, D]
        layer = adapter_layers(adapted)["vision"]
        adapter_alone = benchlib.interleaved_medians(
            {"adapt": lambda: layer.adapt(embeddings)}, warmup=3, repeats=51, device=device
        )["adapt"]["median_s"]
    bare_s = results["get_image_features"]["bare_s"]
    results["adapter_alone_s"] = adapter_alone
    results["component_ratio"] = benchlib.ratio(bare_s + adapter_alone, bare_s)
    return results


# ---------------------------------------------------------------------------------------------------
# 2. Time to a trained adapter


def synthetic_image_folder(root: Path, *, classes: int, per_class: int, size: tuple[int, int], seed: int = 0) -> Path:
    """An image folder ``root/class_XXXX/NN.jpg`` of photo-like JPEGs: real files, real decoding cost.

    ``size`` is ``(width, height)``. Many images are written by all cores (16k of them take seconds).
    """
    from concurrent.futures import ProcessPoolExecutor

    paths, seeds = [], []
    for label in range(classes):
        folder = root / f"class_{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths += [folder / f"{index:02d}.jpg" for index in range(per_class)]
        seeds += [seed * 1_000_003 + label * per_class + index for index in range(per_class)]
    if len(paths) < 256:
        list(map(_write_photo, paths, [size] * len(paths), seeds))
    else:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_photo, paths, [size] * len(paths), seeds, chunksize=64))
    return root


def _write_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    return pipeline_bench.photo_jpeg(path, *size, seed=seed)


def _image_processor(source: str):
    from transformers import AutoProcessor, CLIPImageProcessor

    if os.path.isdir(source):
        return AutoProcessor.from_pretrained(source).image_processor
    return CLIPImageProcessor()  # OpenAI CLIP's preprocessing: 224 px, bicubic, CLIP mean / std


def reference_recipe_step(model, dataset, transform, prompt_ids: torch.Tensor, optimizer, *, batch_size: int):
    """One step of the reference trainer: decode + augment a batch, then BOTH frozen towers, then the adapter.

    The reference code (CoOp's trainer) re-encodes all class prompts on every step, padded to 77 tokens,
    and runs the frozen image encoder on every augmented batch; only the adapter receives gradients.
    """
    from peft_clip_adapter.fewshot.data import load_image

    device = prompt_ids.device
    step = [0]
    scale = model.get_base_model().logit_scale.detach().exp()

    def run() -> float:
        rows = [(step[0] * batch_size + offset) % len(dataset) for offset in range(batch_size)]
        step[0] += 1
        batch = dataset[rows]
        pixels = torch.stack(
            [
                transform(load_image(image), index=row, view=step[0])
                for row, image in zip(rows, batch["image"], strict=True)
            ]
        )
        labels = torch.tensor(batch["label"], device=device)  # [B]
        pixels = pixels.to(device, model.get_base_model().dtype)
        image = model.get_image_features(pixel_values=pixels).pooler_output  # [B, D], adapter applied
        text = model.get_text_features(input_ids=prompt_ids).pooler_output  # [C, D], every step
        logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # [B, C]
        return workloads.optimizer_step(optimizer, logits, labels)

    return run


def floor_pass(model, *, images: int, views: int, batch_size: int, image_size: int, device: str):
    """One bare forward pass over ``images`` x ``views`` pre-made random images, batched like the extraction."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device, model.dtype)

    @torch.no_grad()
    def run() -> None:
        for start in range(0, images, batch_size):
            rows = min(batch_size, images - start)
            for _ in range(views):
                model.get_image_features(pixel_values=pixels[:rows])

    return run


def measure_time_to_adapter(source: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Reference recipe (extrapolated from a few steps) vs ours (in full) vs the floor (in full)."""
    from datasets import load_dataset

    from peft_clip_adapter.fewshot.data import build_train_transform
    from peft_clip_adapter.fewshot.features import FeatureCache

    device, batch, extraction_batch = args.device, args.batch_size, args.extraction_batch_size
    images = args.shots * args.classes
    folder = synthetic_image_folder(
        workdir / "images", classes=args.classes, per_class=args.shots, size=args.image_size
    )
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    processor = _image_processor(source)
    transform = build_train_transform(processor, seed=0)
    model = workloads.clip_adapter(benchlib.build_clip(source).to(device, DTYPES[args.dtype]))
    base = model.get_base_model()
    prompt_ids = benchlib.reference_prompt_ids(base.config.text_config, args.classes).to(device)  # [C, L]
    size = base.config.vision_config.image_size

    # Reference: warm up, time a few steps, extrapolate to every step of every epoch.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2e-3, momentum=0.9)
    step = reference_recipe_step(model, dataset, transform, prompt_ids, optimizer, batch_size=batch)
    for _ in range(args.warmup):
        step()
    step_times = [benchlib.seconds(step, device) for _ in range(args.reference_steps)]
    step_s = sorted(step_times)[len(step_times) // 2]
    total_steps = workloads.steps_per_epoch(images, batch) * args.epochs
    reference_s = step_s * total_steps

    # The floor, then ours: same images x views; ours starts from an empty cache (a cold run).
    def time_floor(views: int) -> float:
        with model.disable_adapter():  # the floor is the bare backbone
            run = floor_pass(
                base, images=images, views=views, batch_size=extraction_batch, image_size=size, device=device
            )
            return benchlib.seconds(run, device)

    with model.disable_adapter():
        for _ in range(args.warmup):
            floor_pass(
                base, images=extraction_batch, views=1, batch_size=extraction_batch, image_size=size, device=device
            )()
    # Half of the floor's views before ours and half after, so a slow drift of a shared machine's speed
    # weighs on both sides alike.
    floor_s = time_floor(args.views // 2)
    with torch.no_grad():
        text_weights = workloads.zero_shot_weights(base, prompt_ids)  # [D, C]
    cache = FeatureCache(workdir / "cache")
    with benchlib.GpuUtilisation(device) as extraction_gpu:
        start = time.perf_counter()
        feature_set = cache.load_or_extract(
            model, dataset, transform, views=args.views, batch_size=extraction_batch, num_workers=args.num_workers
        )
        benchlib.synchronize(device)
        extraction_s = time.perf_counter() - start
    class_embeddings = text_weights.T[:, None, :].contiguous()  # [C, 1, D]
    train = workloads.cached_training_epoch(
        model, class_embeddings, feature_set.features.to(device), feature_set.labels.to(device), batch_size=batch
    )
    with benchlib.GpuUtilisation(device) as training_gpu:
        training_s = benchlib.seconds(lambda: [train() for _ in range(args.epochs)], device)
    floor_s += time_floor(args.views - args.views // 2)
    ours_s = extraction_s + training_s

    result = {
        "images": images,
        "views": args.views,
        "epochs": args.epochs,
        "reference": {
            "measured_steps": args.reference_steps,
            "step_s": step_s,
            "step_times_s": step_times,
            "total_steps": total_steps,
            "total_s": reference_s,
            "extrapolated": True,
        },
        "ours": {"extraction_s": extraction_s, "training_s": training_s, "total_s": ours_s, "extrapolated": False},
        "floor_s": floor_s,
        "ours_over_floor": benchlib.ratio(ours_s, floor_s),
        "extraction_over_floor": benchlib.ratio(extraction_s, floor_s),
        "reference_over_ours": benchlib.ratio(reference_s, ours_s),
        "extraction_batch_size": extraction_batch,
        "dtype": args.dtype,
        "image_size": list(args.image_size),
        "gpu_utilisation_percent": {"extraction": extraction_gpu.mean, "training": training_gpu.mean},
    }
    if args.views != 10:
        result["at_10_views"] = _rescale_views(result, 10)
    return result


def _rescale_views(result: dict[str, Any], views: int) -> dict[str, Any]:
    """Ours and the floor at another number of views: extraction and floor scale with views, training does not.

    Training visits one view per image per epoch, so its cost is independent of the number of views.
    """
    factor = views / result["views"]
    ours = result["ours"]["extraction_s"] * factor + result["ours"]["training_s"]
    floor = result["floor_s"] * factor
    return {
        "views": views,
        "ours_s": ours,
        "floor_s": floor,
        "ours_over_floor": benchlib.ratio(ours, floor),
        "reference_over_ours": benchlib.ratio(result["reference"]["total_s"], ours),
        "extrapolated": True,
    }


# ---------------------------------------------------------------------------------------------------
# 3 and 4. Alternatives and memory: each workload runs in a fresh process (clean peak-memory window)


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``workloads.py`` on ``spec`` in a fresh Python process and return its JSON report.

    Raises:
        ValueError: for an unknown workload (before any process starts).
        RuntimeError: if the probe process fails (its stderr tail is included).
    """
    if spec.get("workload") not in workloads.WORKLOADS:
        raise ValueError(f"Unknown workload {spec.get('workload')!r}; choose one of {sorted(workloads.WORKLOADS)}.")
    script = Path(__file__).resolve().parent / "workloads.py"
    environment = {**os.environ, **benchlib.PROBE_ENVIRONMENT}
    completed = subprocess.run(
        [sys.executable, str(script), json.dumps(spec)], capture_output=True, text=True, env=environment
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Probe {spec['workload']} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_probes(source: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Step time and peak memory of the workloads the selected sections need, each in a fresh process.

    ``memory`` needs inference and cached training; ``alternatives`` needs cached training, LoRA and full FT.
    """
    names = ["cached"]
    names += ["inference"] if "memory" in args.sections else []
    names += ["lora", "full"] if "alternatives" in args.sections else []
    steps = {"inference": args.repeats, "cached": 3, "lora": args.alternative_steps, "full": args.alternative_steps}
    common = {"arch": source, "device": args.device, "batch_size": args.batch_size, "classes": args.classes}
    common |= {"warmup": args.warmup, "views": args.views, "images": args.shots * args.classes}
    reports = {}
    for name in names:
        logger.info("probe %s (%s)", name, workloads.WORKLOADS[name])
        reports[name] = {
            **run_probe({**common, "workload": name, "steps": steps[name]}),
            "what": workloads.WORKLOADS[name],
        }
    return reports


def summarise_alternatives(probes: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Time per epoch (measured steps x steps per epoch) and peak memory of LoRA, full FT and ours."""
    steps = workloads.steps_per_epoch(args.shots * args.classes, args.batch_size)
    ours_epoch = probes["cached"]["step_seconds"]
    summary: dict[str, Any] = {"steps_per_epoch": steps, "ours_epoch_s": ours_epoch}
    for name in ("lora", "full"):
        epoch = probes[name]["step_seconds"] * steps
        summary[name] = {
            "step_s": probes[name]["step_seconds"],
            "epoch_s": epoch,
            "epoch_over_ours": benchlib.ratio(epoch, ours_epoch),
            "peak_bytes": probes[name]["peak_bytes"],
            "peak_over_ours": benchlib.ratio(probes[name]["peak_bytes"], probes["cached"]["peak_bytes"]),
            "extrapolated": "epoch time = median step time x steps per epoch",
        }
    return summary


def summarise_memory(probes: dict[str, dict[str, Any]], source: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of training on cached features vs one inference pass, and the adapter's size on disk."""
    cached, inference = probes["cached"], probes["inference"]
    model = workloads.clip_adapter(benchlib.build_clip(source))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        adapter_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
        folder_bytes = sum(path.stat().st_size for path in Path(folder).iterdir())
    return {
        "method": benchlib.MEMORY_METHODS["cuda" if args.device.startswith("cuda") else "cpu"],
        "inference_peak_bytes": inference["peak_bytes"],
        "cached_training_peak_bytes": cached["peak_bytes"],
        "cached_training_over_inference": benchlib.ratio(cached["peak_bytes"], inference["peak_bytes"]),
        "inference_increment_bytes": inference["increment_bytes"],
        "cached_training_increment_bytes": cached["increment_bytes"],
        "adapter_file_bytes": adapter_bytes,
        "adapter_folder_bytes": folder_bytes,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def build_notes(args: argparse.Namespace) -> list[str]:
    """What each section that ran measured and how, for the report's notes."""
    by_section = {
        "overhead": f"Overhead: median of {args.repeats} interleaved timings after {args.warmup} warm-up round(s); "
        "the 'adapter alone' row times layer.adapt on the batch's pooled embeddings (median of 51).",
        "adapter": f"Time to adapter: the reference recipe re-runs the frozen image tower on each augmented batch "
        f"and the text tower on all {args.classes} prompts (77 tokens) on every step; {args.reference_steps} "
        "step(s) were timed after warm-up and multiplied by steps per epoch x epochs (extrapolated). Ours (cold "
        "feature cache: decode, augment, extract, write safetensors; then every training epoch) and the floor "
        "(the bare backbone over pre-made tensors, batched as the extraction) were timed in full, once (the "
        "floor in two halves, before and after ours).",
        "alternatives": "LoRA / full fine-tuning: steps on a fixed random batch (no decoding or augmentation, "
        "which favours them), AdamW; epoch time = median step x steps per epoch.",
        "memory": f"Memory: {benchlib.MEMORY_METHODS['cuda' if args.device.startswith('cuda') else 'cpu']}. "
        "Peak = everything the process holds (model weights included); increment = peak minus the resident size "
        "after the model was built.",
    }
    model_sections = [name for name in args.sections if name in by_section]
    notes = []
    if model_sections:
        notes.append(
            f"Random-weight models from CLIPConfig (ViT-B/32: patch 32, ViT-B/16: patch 16; 224 px; {args.dtype})."
        )
    notes += [by_section[name] for name in model_sections]
    if {"overhead", "adapter"} & set(args.sections):
        notes.append(
            "On a shared CPU two timings of the same work differ by a few percent from run to run, either way; "
            "an end-to-end ratio within that band (an adapter ratio a little above or below 1, ours / floor "
            "below 1) is that jitter, and the '(backbone + adapter alone) / backbone' row isolates the adapter's "
            "own cost."
        )
    if args.views != 10 and "adapter" in args.sections:
        notes.append(
            f"Measured at {args.views} views; the '10 views' rows scale extraction and floor by 10/{args.views} "
            "(both are linear in views) and keep the training time (one view per image per epoch)."
        )
    if "pipeline" in args.sections:
        notes += [
            "Input pipeline: generated photo-like JPEGs (smooth colour regions plus noise, quality 90). CPU ms are "
            f"medians over the photos of the median of {args.pipeline_repeats} timings after a warm-up, in one "
            "thread (what a DataLoader worker gets). 'Before' is the extraction code this pipeline replaced (a full "
            "decode, then a PIL crop, resize, flip and float64 normalisation per view); 'CPU views' decode once "
            "(large JPEGs at reduced scale) and resample each view's box with PIL; 'device views, CPU side' only "
            "decode and hand over the 8-bit image, and the device's own work (render_views + normalisation) is "
            f"timed apart on {args.device}.",
            f"Extraction throughput: FeatureCache.load_or_extract from a cold cache, {args.pipeline_images} JPEGs "
            f"of 500x375 x {args.views} views, batch {args.pipeline_batch_size}, a CLIP with 224-px inputs and a "
            "one-layer, 32-wide vision tower (so that the pipeline is the bottleneck), one torch thread in the "
            f"main process; the worker counts take turns, median of {args.pipeline_repeats}. The CPU seconds of "
            "the main process and of the workers (getrusage) give the time with a free core per process, the "
            "busiest one's CPU time: the speed-up the pipeline allows, which a machine whose cores other jobs "
            "hold cannot show in wall time.",
        ]
    if args.tiny:
        notes.append("Tiny mode: a tiny random CLIP and tiny sizes; the numbers only show that the script works.")
    return notes


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the selected sections for each architecture and return the report."""
    machine = benchlib.machine_description(args.device)
    report: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "settings": {key: value for key, value in vars(args).items() if key != "architectures"},
        "targets": TARGETS,
        "results": {},
        "notes": build_notes(args),
    }
    with tempfile.TemporaryDirectory() as scratch:
        if "pipeline" in args.sections:  # one backbone of its own, whatever --arch says
            logger.info("input pipeline")
            report["pipeline"] = pipeline_bench.measure_pipeline(args, Path(tempfile.mkdtemp(dir=scratch)))
        sources = {"tiny": _tiny_clip(Path(scratch))} if args.tiny else {arch: arch for arch in args.architectures}
        if args.sections == ["pipeline"]:
            sources = {}
        for label, source in sources.items():
            result: dict[str, Any] = {}
            if "overhead" in args.sections:
                logger.info("%s: inference overhead", label)
                result["overhead"] = measure_overhead(source, args)
            if "adapter" in args.sections:
                logger.info("%s: time to a trained adapter", label)
                result["adapter"] = measure_time_to_adapter(source, args, Path(tempfile.mkdtemp(dir=scratch)))
            if {"alternatives", "memory"} & set(args.sections):
                probes = measure_probes(source, args)
                result["probes"] = probes
                if "alternatives" in args.sections:
                    result["alternatives"] = summarise_alternatives(probes, args)
                if "memory" in args.sections:
                    result["memory"] = summarise_memory(probes, source, args)
            report["results"][label] = result
    report["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return report


def _tiny_clip(folder: Path) -> str:
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    return build_tiny_clip(folder / "tiny-clip")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Parse ``argv``, run, print the ratio table and write ``speed_<device>[_tiny].json`` / ``.md``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = " ".join(["python benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    report = run(args, command)
    markdown = render_markdown(report)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    stem = f"speed_{device}" + ("_pipeline" if args.sections == ["pipeline"] else "") + ("_tiny" if args.tiny else "")
    paths = benchlib.write_results(report, markdown, args.output_dir or RESULTS_DIR, stem)
    print(markdown)
    print("\nWrote " + ", ".join(str(path) for path in paths))
    return report


if __name__ == "__main__":
    main()
