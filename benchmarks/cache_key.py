"""What the feature cache's content digest costs: hashing every image file, against extracting its features.

    python benchmarks/cache_key.py                      # 256 JPEGs of 500x375, tiny CLIP and a real-size ViT-B/32
    python benchmarks/cache_key.py --images 32 --arch tiny   # seconds (the smoke test)

``FeatureCache``'s key covers the content of every image (``dataset_fingerprint`` reads and hashes each
file), so an image replaced in place under the same path and modification time is never served stale
features. This measures, in one run and in turns: the digest over all images (MB/s), the key as it was
before (image paths only: the floor), and a first, uncached extraction of the same images (decode,
eval transform, backbone; one view). The digest's share of a first run is ``digest / (digest +
extraction)``; on a cache hit the digest is the price of trusting the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import benchlib
import datasets
import numpy as np
from PIL import Image

from peft_clip_adapter.fewshot.data import build_eval_transform
from peft_clip_adapter.fewshot.features import dataset_fingerprint, extract_image_features

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="Number of JPEG images (default: 256).")
    parser.add_argument("--arch", default="tiny,vit-b-32", help="Comma-separated: tiny, vit-b-32, vit-b-16.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per measurement (default: 3).")
    parser.add_argument("--output_dir", default=str(RESULTS_DIR), help="Where cache_key_cpu.json/.md go.")
    return parser.parse_args(argv)


def write_images(folder: Path, count: int) -> datasets.Dataset:
    """``count`` 500x375 JPEGs (quality 90, smooth colour fields with noise: photo-like file sizes)."""
    generator = np.random.default_rng(0)
    for index in range(count):
        label = f"class_{index % 4}"
        (folder / label).mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:375, 0:500]
        base = np.stack([x * (index % 7 + 1) / 7, y * (index % 5 + 1) / 5, (x + y) / 3], axis=-1) % 256
        pixels = np.clip(base + generator.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / label / f"{index:05d}.jpg", quality=90)
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")


def paths_only_key(dataset: datasets.Dataset) -> str:
    """The key before content digests: the ``datasets`` fingerprint and the image paths."""
    digest = hashlib.sha256(dataset._fingerprint.encode())
    for value in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
        digest.update(repr(value.get("path")).encode())
    return digest.hexdigest()


def model_and_processor(arch: str, folder: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, CLIPImageProcessor

    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    if arch == "tiny":
        path = build_tiny_clip(folder / "tiny-clip")
        return benchlib.build_clip(path), AutoProcessor.from_pretrained(path).image_processor
    return benchlib.build_clip(arch), CLIPImageProcessor()  # OpenAI CLIP's preprocessing, 224 px


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = write_images(Path(scratch) / "images", args.images)
        total_bytes = sum(path.stat().st_size for path in (Path(scratch) / "images").rglob("*.jpg"))
        rows = []
        for arch in [name.strip() for name in args.arch.split(",") if name.strip()]:
            model, processor = model_and_processor(arch, Path(scratch))
            transform = build_eval_transform(processor)
            timings = benchlib.interleaved_medians(
                {
                    "digest": lambda: dataset_fingerprint(dataset),
                    "paths only": lambda: paths_only_key(dataset),
                    "extraction": lambda model=model, transform=transform: extract_image_features(
                        model, dataset, transform, batch_size=32
                    ),
                },
                warmup=1,
                repeats=args.repeats,
            )
            digest, floor, extraction = (timings[name]["median_s"] for name in ("digest", "paths only", "extraction"))
            rows.append(
                {
                    "arch": arch,
                    "digest_s": digest,
                    "paths_only_s": floor,
                    "extraction_s": extraction,
                    "digest_mb_per_s": round(total_bytes / 1e6 / digest, 1),
                    "digest_share_of_first_run": benchlib.ratio(digest, digest + extraction),
                    "digest_over_extraction": benchlib.ratio(digest, extraction),
                }
            )
    command = "python benchmarks/cache_key.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {
        "command": command.strip(),
        "machine": benchlib.machine_description("cpu"),
        "images": args.images,
        "image_bytes": total_bytes,
        "mean_image_kb": round(total_bytes / args.images / 1e3, 1),
        "rows": rows,
    }
    table = benchlib.markdown_table(
        ["backbone", "digest (s)", "MB/s", "paths only (s)", "extraction (s)", "digest / first run"],
        [
            [row["arch"], row["digest_s"], row["digest_mb_per_s"], row["paths_only_s"], row["extraction_s"],
             f"{100 * row['digest_share_of_first_run']:.2f}%"]
            for row in rows
        ],
    )  # fmt: skip
    markdown = (
        f"## Feature-cache key: content digest\n\n`{data['command']}`: {args.images} JPEGs of 500x375 "
        f"({data['mean_image_kb']} kB on average), one view, medians of {args.repeats} interleaved rounds.\n\n"
        f"{table}\n"
    )
    print(markdown)
    benchlib.write_results(data, markdown, args.output_dir, "cache_key_cpu")
    return data


if __name__ == "__main__":
    main()
