"""The input pipeline of feature extraction: DataLoader workers, fixed batches, views made on the device,
JPEG draft decoding, mixed precision, and what happens when a worker fails or the run is interrupted.

Stated tolerances (checked here on CPU tensors; on CUDA too when a GPU is present):
- views made on the device vs PIL's, on photographs: every pixel within one 8-bit level (and 95% equal);
  the tiny CLIP's features from the two then differ by at most 2e-3 of their norm;
- bf16 (autocast, or a backbone loaded in bf16) vs float32 features: at most 3e-2 of their norm.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from peft_clip_adapter.fewshot import features as features_module
from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform
from peft_clip_adapter.fewshot.features import FeatureCache, extract_image_features
from peft_clip_adapter.fewshot.inputs.images import load_image_draft
from peft_clip_adapter.fewshot.inputs.loader import default_num_workers
from peft_clip_adapter.fewshot.inputs.resample import ViewBatch, render_views

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

SIZES = [(160, 120), (120, 160), (97, 33), (300, 225), (64, 64), (1200, 900)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour regions plus sensor-like noise (JPEG has real work to do)."""
    rng = np.random.default_rng(seed)
    cells = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(cells).astype(np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> datasets.Dataset:
    """12 JPEGs of several sizes and aspect ratios (one large enough for draft decoding), two classes."""
    root = tmp_path_factory.mktemp("photos")
    for index in range(12):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        photo(*SIZES[index % len(SIZES)], seed=index).save(folder / f"{index:02d}.jpg", quality=90)
    return datasets.load_dataset("imagefolder", data_dir=str(root), split="train")


@pytest.fixture(scope="module")
def clip(tiny_clip_path) -> CLIPModel:
    return CLIPModel.from_pretrained(tiny_clip_path).eval()


class FloatViews:
    """A transform of the user's own (no boxes, float output): workers call it with the decoded image."""

    description = "test float views"

    def __call__(self, image: Image.Image, *, index: int = 0, view: int = 0) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.resize((32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)
        return pixels.flip(-1) if (index + view) % 2 else pixels  # [3, 32, 32]


class InputsByName(FloatViews):
    """The same views, returned as the model's keyword arguments (as a processor with several outputs would)."""

    description = "test inputs by name"

    def __call__(self, image: Image.Image, *, index: int = 0, view: int = 0) -> dict[str, torch.Tensor]:
        return {"pixel_values": super().__call__(image, index=index, view=view)}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


def test_features_are_bitwise_identical_for_any_number_of_workers(clip, tiny_processor, photos):
    transform = build_train_transform(tiny_processor, seed=3)
    runs = {
        workers: extract_image_features(clip, photos, transform, views=3, batch_size=5, num_workers=workers)
        for workers in (0, 1, 2)
    }
    assert runs[0].features.shape == (3, 12, 32) and runs[0].features.dtype == torch.float32
    assert all(torch.equal(run.features, runs[0].features) for run in runs.values())
    custom = [extract_image_features(clip, photos, FloatViews(), views=2, num_workers=n) for n in (0, 2)]
    assert torch.equal(custom[0].features, custom[1].features)
    by_name = extract_image_features(clip, photos, InputsByName(), views=2, num_workers=2)  # a dict of inputs
    assert torch.equal(by_name.features, custom[0].features)
    accelerated = extract_image_features(
        clip, photos, transform, views=3, batch_size=5, num_workers=2, accelerator=Accelerator(cpu=True)
    )
    assert torch.equal(accelerated.features, runs[0].features)


def _tiny_processor_with(**settings) -> CLIPImageProcessor:
    base = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    return CLIPImageProcessor(**{**base, **settings})


@pytest.mark.parametrize(
    "transform",
    [
        *(
            build_train_transform(_tiny_processor_with(), seed=1, resample=resample)
            for resample in Image.Resampling
            if resample.name not in ("MKS2013", "MKS2021")  # Pillow 13's MKS kernels: not reproduced
        ),
        build_eval_transform(_tiny_processor_with()),
        build_eval_transform(_tiny_processor_with(resample=Image.Resampling.BILINEAR)),
        build_eval_transform(_tiny_processor_with(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 28})),
        build_eval_transform(_tiny_processor_with(size={"height": 24, "width": 40}, do_center_crop=False)),
    ],
    ids=lambda transform: transform.description[:40],
)
def test_device_views_are_pil_views_within_one_level(photos, transform):
    values = photos.cast_column("image", datasets.Image(decode=False))["image"]
    views = range(4)
    decoded = [transform.decode(value) for value in values]
    images = [torch.from_numpy(np.array(image.image)).permute(2, 0, 1) for image in decoded]
    boxes = [transform.view_boxes(image, index=row, views=views) for row, image in enumerate(decoded)]
    on_device = render_views(
        ViewBatch.collate(images, boxes), output_size=transform.output_size, resample=transform.resample
    )  # [V, N, 3, H, W], images of several sizes padded into one batch
    on_cpu = torch.stack([transform.crops(value, index=row, views=views) for row, value in enumerate(values)], dim=1)
    difference = (on_device.int() - on_cpu.int()).abs()
    assert on_device.dtype == torch.uint8 and on_device.shape == on_cpu.shape
    # PIL may run the vertical pass first (then about 1 pixel in 20 rounds the other way), else ~1 in 10^5.
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.05


def test_device_view_features_agree_with_cpu_view_features(clip, tiny_processor, photos):
    for transform, views in (
        (build_train_transform(tiny_processor, seed=0), 3),
        (build_eval_transform(tiny_processor), 1),
    ):
        on_cpu = extract_image_features(clip, photos, transform, views=views, num_workers=0, views_on_device=False)
        on_device = extract_image_features(clip, photos, transform, views=views, num_workers=2, views_on_device=True)
        assert _relative_error(on_device.features, on_cpu.features) <= 2e-3
        assert not torch.equal(on_device.features, on_cpu.features) or views == 1


def test_bf16_features_are_within_tolerance_and_stored_as_float32(clip, tiny_clip_path, tiny_processor, photos):
    transform = build_train_transform(tiny_processor, seed=0)
    run = dict(views=2, batch_size=6, num_workers=0)
    reference = extract_image_features(clip, photos, transform, **run).features
    autocast = extract_image_features(clip, photos, transform, mixed_precision="bf16", **run)
    half_model = extract_image_features(
        CLIPModel.from_pretrained(tiny_clip_path, dtype=torch.bfloat16), photos, transform, **run
    )
    for feature_set in (autocast, half_model):
        assert feature_set.features.dtype == torch.float32
        assert 0 < _relative_error(feature_set.features, reference) <= 3e-2
    # The accelerator's mixed precision is what extraction autocasts to, unless told otherwise.
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    via_accelerator = extract_image_features(clip, photos, transform, accelerator=accelerator, **run)
    assert torch.equal(via_accelerator.features, autocast.features)
    forced_off = extract_image_features(clip, photos, transform, accelerator=accelerator, mixed_precision="no", **run)
    assert torch.equal(forced_off.features, reference)
    stored_half = extract_image_features(clip, photos, transform, features_dtype=torch.bfloat16, **run)
    assert stored_half.features.dtype == torch.bfloat16 and torch.equal(stored_half.features, reference.bfloat16())


def test_cache_key_follows_what_changes_the_features_not_the_workers(
    clip, tiny_clip_path, tiny_processor, photos, tmp_path
):
    cache, transform = FeatureCache(tmp_path / "cache"), build_train_transform(tiny_processor, seed=0)
    first = cache.load_or_extract(clip, photos, transform, views=2, num_workers=0)
    again = cache.load_or_extract(clip, photos, transform, views=2, num_workers=2)
    assert cache.last_hit is True and torch.equal(again.features, first.features)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def key(model=clip, transform=transform, **options):
        settings = features_module.resolve_extraction(transform, torch.device("cpu"), **options)
        return cache.key(model, photos, transform, views=2, settings=settings)

    assert key() == cache.key(clip, photos, transform, views=2) == key(num_workers=5)
    others = [
        key(views_on_device=True),
        key(mixed_precision="bf16"),
        key(mixed_precision="fp16"),
        key(features_dtype=torch.float16),
        key(transform=build_train_transform(tiny_processor, seed=0, draft=False)),
        key(model=CLIPModel.from_pretrained(tiny_clip_path, dtype=torch.bfloat16)),
    ]
    assert len({key(), *others}) == 1 + len(others)
    assert key(mixed_precision="fp8") == key(mixed_precision="bf16")  # fp8 autocasts to bf16, as Accelerate does
    stored_half = cache.load_or_extract(clip, photos, transform, views=2, features_dtype=torch.bfloat16)
    assert (
        cache.last_hit is False
        and cache.load(cache.last_path.stem.rpartition("-")[2]).features.dtype == torch.bfloat16
    )
    assert torch.equal(stored_half.features, first.features.bfloat16())


def _with_broken_row(photos: datasets.Dataset, broken: Path, row: int) -> datasets.Dataset:
    broken.write_bytes(b"not a jpeg")
    columns = photos.cast_column("image", datasets.Image(decode=False)).to_dict()
    columns["image"][row] = {"path": str(broken), "bytes": None}
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def test_unreadable_image_in_a_worker_gives_the_in_process_error(clip, tiny_processor, photos, tmp_path):
    data = _with_broken_row(photos, tmp_path / "broken.jpg", row=9)
    transform = build_train_transform(tiny_processor)
    messages = []
    for options in ({"num_workers": 0}, {"num_workers": 2}, {"num_workers": 2, "views_on_device": True}):
        with pytest.raises(ValueError, match=r"^Cannot read image file '.*broken\.jpg': ") as caught:
            extract_image_features(clip, data, transform, batch_size=4, **options)
        messages.append(str(caught.value))
    assert len(set(messages)) == 1 and "worker" not in messages[0]
    assert multiprocessing.active_children() == []


class KillsItsWorker:
    """Kills the DataLoader worker process that reads row 7, as the kernel's out-of-memory killer would."""

    description = "kills the worker reading row 7"

    def __call__(self, image: Image.Image, *, index: int = 0, view: int = 0) -> torch.Tensor:
        if index == 7 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, 32, 32)


def test_killed_worker_fails_clearly_and_caches_nothing(clip, photos, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(
        RuntimeError,
        match=r"DataLoader worker decoding images for feature extraction died .*"
        r"no features were cached.*num_workers=0",
    ):
        cache.load_or_extract(clip, photos, KillsItsWorker(), batch_size=4, num_workers=2)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    assert multiprocessing.active_children() == []


def test_interrupted_extraction_leaves_no_cache_file(clip, tiny_processor, photos, tmp_path, monkeypatch):
    cache, transform = FeatureCache(tmp_path / "cache"), build_train_transform(tiny_processor)
    calls = []

    def interrupt(*args):  # Ctrl-C arrives while the backbone runs its second batch; workers are busy
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = clip.vision_model.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            cache.load_or_extract(clip, photos, transform, views=2, batch_size=4, num_workers=2)
    finally:
        handle.remove()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    assert multiprocessing.active_children() == []

    # Interrupted while the file is being written: no partial file either.
    def half_written(tensors, path, metadata):
        Path(path).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_extract(clip, photos, transform, views=1, num_workers=0)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_workers": -1}, r"num_workers=-1 must be an integer >= 0 \(0 decodes in the main process\)"),
        ({"num_workers": 1.5}, r"num_workers=1.5 must be an integer >= 0"),
        ({"mixed_precision": "bf32"}, r"mixed_precision='bf32' must be one of \['no', 'bf16', 'fp16', 'fp8'\]"),
        ({"features_dtype": torch.float64}, r"features_dtype=torch.float64 must be one of"),
        ({"views_on_device": True}, r"views_on_device=True needs a transform whose views the device can make"),
    ],
)
def test_bad_pipeline_options_are_refused(clip, photos, options, match):
    with pytest.raises(ValueError, match=match):
        extract_image_features(clip, photos, FloatViews(), **options)
    with pytest.raises(ValueError, match=match):
        FeatureCache("unused").load_or_extract(clip, photos, FloatViews(), **options)


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 8  # capped
    assert default_num_workers(device="cpu") == 2  # a CPU backbone keeps most cores for its own threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers() == 4 and default_num_workers(device="cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_num_workers() == 1  # feeding a GPU, decoding leaves the main process even on 1 core
    # ... unless there is too little to read for a worker's start-up to pay off: 4 chunks of 8 rows each.
    assert [default_num_workers(num_chunks) for num_chunks in (1, 3, 4, 40)] == [0, 0, 1, 1]


def test_draft_decoding_never_goes_below_the_resolution_the_crop_needs(tiny_processor, tmp_path):
    path = tmp_path / "large.jpg"
    photo(1200, 900, seed=0).save(path, quality=92)
    train = build_train_transform(tiny_processor, seed=0)  # 32 px crops, scale down to 0.08
    decoded = train.decode(str(path))
    assert decoded.scale == 4 and decoded.size == (1200, 900) and decoded.image.size == (300, 225)
    boxes = [box for index in range(40) for box in train.view_boxes(decoded, index=index, views=range(10))]
    widths = [box.box[2] - box.box[0] for box in boxes]  # in decoded pixels
    heights = [box.box[3] - box.box[1] for box in boxes]
    assert min(widths) >= 32 and min(heights) >= 32  # every crop still holds the output's 32 x 32 pixels
    assert 4 <= train.max_scale(1200, 900) < 8  # the smallest crop the settings allow rules out 1/8
    full = build_train_transform(tiny_processor, seed=0, draft=False)
    assert full.decode(str(path)).scale == 1 and full.description != train.description
    levels = train.crops(str(path), index=5, views=range(4)).float() - full.crops(str(path), index=5, views=range(4))
    assert levels.abs().mean() < 4  # two antialiased reductions of the same picture

    evaluate = build_eval_transform(tiny_processor)  # the smallest edge 900 -> 32: 1/8 keeps 112 >= 32
    assert evaluate.decode(str(path)).scale == 8 and evaluate(str(path)).shape == (3, 32, 32)
    assert evaluate.decode(Image.open(path)).scale == 1  # an already decoded image stays as it is
    png = tmp_path / "large.png"
    photo(1200, 900, seed=0).save(png)
    assert load_image_draft(str(png), lambda width, height: 8.0).scale == 1  # only JPEG has DCT scaling


def test_trainer_workers_give_the_same_adapter_and_bf16_backbone_trains(tiny_clip_path, shapes_dir, tmp_path):
    flags = dict(shots=4, views=2, num_train_epochs=2, per_device_train_batch_size=8, per_device_eval_batch_size=6)
    runs = {}
    for name, extra in (("in-process", {"dataloader_num_workers": 0}), ("workers", {"dataloader_num_workers": 2})):
        argv = helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path / name, **flags, **extra)
        runs[name] = helpers.run_fewshot(argv).results
    first, second = (helpers.adapter_tensors(tmp_path / name / "out") for name in runs)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs["workers"]["dataloader_num_workers"] == 2 and runs["workers"]["torch_dtype"] == "float32"
    end_to_end = helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path / "e2e", **flags, torch_dtype="bfloat16")
    half = helpers.run_fewshot([*end_to_end, "--end_to_end"]).results
    assert half["torch_dtype"] == "bfloat16" and half["mixed_precision"] == "no" and 0 <= half["eval_accuracy"] <= 1


def test_trainer_refuses_negative_workers(tiny_clip_path, shapes_dir, tmp_path):
    argv = helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path, dataloader_num_workers=-1)
    helpers.fewshot_error(argv, r"--dataloader_num_workers must be >= 0 \(0 decodes images in the main")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_pinned_batches_and_bf16(tiny_clip_path, tiny_processor, photos):
    reference_model = CLIPModel.from_pretrained(tiny_clip_path)
    transform = build_train_transform(tiny_processor, seed=0)
    reference = extract_image_features(reference_model, photos, transform, views=2, num_workers=0).features
    model = CLIPModel.from_pretrained(tiny_clip_path).cuda()
    on_device = extract_image_features(model, photos, transform, views=2, num_workers=2)  # device views by default
    on_cpu = extract_image_features(model, photos, transform, views=2, num_workers=2, views_on_device=False)
    assert on_device.features.device.type == "cpu" and on_device.features.dtype == torch.float32
    assert _relative_error(on_device.features, reference) <= 2e-3
    assert _relative_error(on_cpu.features, reference) <= 1e-4
    autocast = extract_image_features(model, photos, transform, views=2, mixed_precision="bf16")
    assert _relative_error(autocast.features, reference) <= 3e-2
