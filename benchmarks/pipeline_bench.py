"""The input-pipeline section of ``speed.py``: what feature extraction costs the CPU per view and per image.

Measured in one run, on generated photo-like JPEGs (smooth colour regions plus sensor-like noise, quality
90) at 500x375 and 12 MP (4000x3000):

- CPU milliseconds per training view and per eval image, one thread, for the code before the pipeline
  (``legacy_*``: a full decode, then a PIL crop, resize, flip and float64 normalisation per view, kept
  here as the baseline), for ours with the views made by PIL in the worker (CPU views), and for the CPU
  side of ours with the views made on the device (decode and hand over the 8-bit image); the device's
  own work (``render_views`` and the normalisation) is timed apart, on ``--device``.
- Extraction throughput (images per second) through ``FeatureCache.load_or_extract`` with a tiny
  224-px backbone, so that the input pipeline is the bottleneck, at 0, 1 and 2 DataLoader workers, with
  the views made on the CPU (and, on an accelerator, on the device).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
from PIL import Image

#: The photo sizes measured: a typical dataset image and a phone photo.
PHOTO_SIZES = {"500x375": (500, 375), "12MP": (4000, 3000)}
#: The same roles in --tiny mode (seconds, not minutes).
TINY_PHOTO_SIZES = {"500x375": (80, 60), "12MP": (400, 300)}


def photo_jpeg(path: Path, width: int, height: int, *, seed: int, quality: int = 90) -> Path:
    """Write a photo-like JPEG: smooth colour regions plus noise, so that decoding has real work to do.

    Example:
        >>> import tempfile
        >>> path = photo_jpeg(Path(tempfile.mkdtemp()) / "p.jpg", 64, 48, seed=0)
        >>> Image.open(path).size
        (64, 48)
    """
    rng = np.random.default_rng(seed)
    cells = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(cells, dtype=np.int16) + rng.normal(0, 14, (height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=quality)
    return path


def _median_ms(call: Callable[[], Any], repeats: int, device: str = "cpu") -> float:
    call()  # warm-up: file cache, allocator, lazy tables
    return 1000 * statistics.median(benchlib.seconds(call, device) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------------
# The code before the pipeline, kept as the baseline of the ratios


def _legacy_normalise(image: Image.Image, steps) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    scaled = (pixels * np.float64(steps.rescale_factor)).astype(np.float32)
    mean, std = np.asarray(steps.mean, np.float32), np.asarray(steps.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1)))  # [3, H, W]


def legacy_train_views(path: Path, transform, *, index: int, views: int) -> torch.Tensor:
    """The train views as extraction made them before: full decode, then crop, resize, flip, normalise each."""
    from peft_clip_adapter.fewshot.data import load_image

    image = load_image(str(path))
    height, width = transform.size
    out = []
    for view in range(views):
        box, flip = transform.augmentation.sample(image.width, image.height, index=index, view=view)  # the same crop
        crop = image.crop(box).resize((width, height), transform.resample)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(_legacy_normalise(crop, transform.steps))
    return torch.stack(out)  # [V, 3, H, W]


def legacy_eval_image(path: Path, transform) -> torch.Tensor:
    """The eval image as extraction made it before: full decode, the processor's resize and crop, normalise."""
    from peft_clip_adapter.fewshot.data import load_image

    image = load_image(str(path))
    box = transform.view_box(image.width, image.height, index=0, view=0)
    image = image.resize(box.resized[::-1], resample=transform.resample)
    (top, left), (height, width) = box.offset, transform.output_size
    return _legacy_normalise(image.crop((left, top, left + width, top + height)), transform.steps)


# ---------------------------------------------------------------------------------------------------
# Per-view CPU cost


def _device_side_inputs(path: Path, transform, *, index: int, views: int):
    """What a worker hands over for views made on the device: the decoded 8-bit image and the boxes."""
    decoded = transform.decode(str(path))
    pixels = torch.from_numpy(np.array(decoded.image)).permute(2, 0, 1).contiguous()  # [3, h, w]
    return pixels, transform.view_boxes(decoded, index=index, views=range(views))


def measure_costs(paths: dict[str, list[Path]], args) -> dict[str, Any]:
    """CPU ms per training view and per eval image (one thread), before and now, per photo size."""
    from peft_clip_adapter.fewshot.inputs.images import load_image
    from peft_clip_adapter.fewshot.inputs.resample import ViewBatch, render_views

    train, evaluate = _transforms()
    views, repeats, device = args.views, args.pipeline_repeats, args.device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker process gets
    try:
        results: dict[str, Any] = {}
        for label, files in paths.items():
            per_image: dict[str, list[float]] = {}

            def timed(name: str, call: Callable[[], Any], on: str = "cpu") -> None:
                per_image.setdefault(name, []).append(_median_ms(call, repeats, on))  # noqa: B023

            for index, path in enumerate(files):
                timed("decode_full_ms", lambda p=path: load_image(str(p)))
                timed("decode_train_ms", lambda p=path: train.decode(str(p)))
                timed("decode_eval_ms", lambda p=path: evaluate.decode(str(p)))
                timed("train_legacy_ms", lambda p=path, i=index: legacy_train_views(p, train, index=i, views=views))
                timed(
                    "train_cpu_views_ms",
                    lambda p=path, i=index: train.normalise(train.crops(str(p), index=i, views=range(views))),
                )
                timed(
                    "train_device_views_cpu_ms",
                    lambda p=path, i=index: _device_side_inputs(p, train, index=i, views=views),
                )
                pixels, boxes = _device_side_inputs(path, train, index=index, views=views)
                batch = ViewBatch.collate([pixels], [boxes]).to(device)
                timed(
                    "train_device_ops_ms",
                    lambda b=batch: train.normalise(render_views(b, output_size=train.size, resample=train.resample)),
                    device,
                )
                timed("eval_legacy_ms", lambda p=path: legacy_eval_image(p, evaluate))
                timed("eval_ours_ms", lambda p=path: evaluate(str(p)))
                decoded = train.decode(str(path))
                results.setdefault(label, {})["train_decode_scale"] = decoded.scale
                results[label]["eval_decode_scale"] = evaluate.decode(str(path)).scale
            entry = results[label]
            entry.update({name: statistics.median(values) for name, values in per_image.items()})
            for name in ("train_legacy_ms", "train_cpu_views_ms", "train_device_views_cpu_ms", "train_device_ops_ms"):
                entry[name.replace("_ms", "_ms_per_view")] = entry[name] / views
            entry["train_views_speedup_cpu_views"] = benchlib.ratio(
                entry["train_legacy_ms"], entry["train_cpu_views_ms"]
            )
            entry["train_views_speedup_device_views"] = benchlib.ratio(
                entry["train_legacy_ms"], entry["train_device_views_cpu_ms"]
            )
            entry["eval_speedup"] = benchlib.ratio(entry["eval_legacy_ms"], entry["eval_ours_ms"])
            entry["images"] = len(files)
        return results
    finally:
        torch.set_num_threads(threads)


def _transforms():
    from transformers import CLIPImageProcessor

    from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform

    processor = CLIPImageProcessor()  # OpenAI CLIP's preprocessing: 224 px, bicubic, CLIP mean / std
    return build_train_transform(processor, seed=0), build_eval_transform(processor)


# ---------------------------------------------------------------------------------------------------
# Extraction throughput


def tiny_224_backbone(seed: int = 0):
    """A CLIP with real 224-px inputs but a one-layer, 32-wide vision tower: its forward costs next to nothing.

    Example:
        >>> tiny_224_backbone().config.vision_config.image_size
        224
    """
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        vision_config={**small, "image_size": 224, "patch_size": 32},
        text_config=small,
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def measure_throughput(folder: Path, args) -> dict[str, Any]:
    """Images per second through ``load_or_extract`` (cold cache) at each worker count, views on CPU and device."""
    import datasets

    from peft_clip_adapter.fewshot.features import FeatureCache

    train, _ = _transforms()
    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    model = tiny_224_backbone().to(args.device)
    settings = [(workers, False) for workers in args.pipeline_workers]
    if args.device != "cpu":  # on a CPU the device's work is PIL's, ten times over (see the costs): not run
        settings += [(workers, True) for workers in sorted({min(args.pipeline_workers), max(args.pipeline_workers)})]
    times: dict[tuple[int, bool], list[float]] = {setting: [] for setting in settings}
    cpu: dict[tuple[int, bool], list[tuple[float, float]]] = {setting: [] for setting in settings}

    def run(workers: int, on_device: bool) -> None:
        with tempfile.TemporaryDirectory() as cache_dir:  # cold: extraction every time
            FeatureCache(cache_dir).load_or_extract(
                model,
                dataset,
                train,
                views=args.views,
                batch_size=args.pipeline_batch_size,
                num_workers=workers,
                views_on_device=on_device,
            )

    threads = torch.get_num_threads()
    # One intra-op thread in the main process for every worker count: the tiny backbone needs no more, and
    # more would compete with the workers for the cores (and count against the runs with workers).
    torch.set_num_threads(1)
    try:
        run(*settings[0])  # warm-up
        for round_index in range(args.pipeline_repeats):
            order = settings if round_index % 2 == 0 else list(reversed(settings))  # taking turns, as elsewhere
            for setting in order:
                before = _cpu_seconds()
                times[setting].append(benchlib.seconds(lambda s=setting: run(*s), args.device))
                after = _cpu_seconds()
                cpu[setting].append((after[0] - before[0], after[1] - before[1]))
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"images": len(dataset), "views": args.views, "batch_size": args.pipeline_batch_size}
    runs = {}
    for (workers, on_device), values in times.items():
        seconds = statistics.median(values)
        main_cpu = statistics.median(main for main, _ in cpu[(workers, on_device)])
        workers_cpu = statistics.median(children for _, children in cpu[(workers, on_device)])
        runs[f"{'device' if on_device else 'cpu'}_views_{workers}_workers"] = {
            "workers": workers,
            "views_on_device": on_device,
            "seconds": seconds,
            "times_s": values,
            "images_per_s": len(dataset) / seconds,
            "views_per_s": len(dataset) * args.views / seconds,
            "main_cpu_s": main_cpu,
            "workers_cpu_s": workers_cpu,
            # What the wall time would be with a free core for each process: the busiest one's CPU time.
            "free_cores_seconds": max(main_cpu, workers_cpu / workers) if workers else main_cpu,
        }
    result["runs"] = runs
    base = runs[f"cpu_views_{min(args.pipeline_workers)}_workers"]["images_per_s"]
    most = runs[f"cpu_views_{max(args.pipeline_workers)}_workers"]["images_per_s"]
    result["workers_speedup"] = benchlib.ratio(most, base)
    result["workers_compared"] = [min(args.pipeline_workers), max(args.pipeline_workers)]
    fewest_run = runs[f"cpu_views_{min(args.pipeline_workers)}_workers"]
    most_run = runs[f"cpu_views_{max(args.pipeline_workers)}_workers"]
    result["workers_speedup_free_cores"] = benchlib.ratio(
        fewest_run["free_cores_seconds"], most_run["free_cores_seconds"]
    )
    return result


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) used so far by this process, and by its finished child processes."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def measure_pipeline(args, workdir: Path) -> dict[str, Any]:
    """The whole section: generate the photos, then the per-view costs and the extraction throughput."""
    sizes = TINY_PHOTO_SIZES if args.tiny else PHOTO_SIZES
    per_size = 1 if args.tiny else 2
    paths = {
        label: [photo_jpeg(workdir / f"{label}-{i}.jpg", *size, seed=i) for i in range(per_size)]
        for label, size in sizes.items()
    }
    folder = workdir / "extraction"
    width, height = sizes["500x375"]
    for index in range(args.pipeline_images):
        target = folder / f"class_{index % 4}"
        target.mkdir(parents=True, exist_ok=True)
        photo_jpeg(target / f"{index:04d}.jpg", width, height, seed=100 + index)
    return {
        "photo_sizes": {label: list(size) for label, size in sizes.items()},
        "views": args.views,
        "costs": measure_costs(paths, args),
        "throughput": measure_throughput(folder, args),
    }
