"""Frozen-feature extraction and its on-disk cache, and the property that makes them worth having:
training the adapter on cached features gives the same adapter as training end to end."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from PIL import Image
from torch.nn import functional as F
from transformers import CLIPModel, CLIPTextModelWithProjection

from peft_clip_adapter import CLIPAdapterConfig, adapter_layers
from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts
from peft_clip_adapter.fewshot.data import build_train_transform, load_image
from peft_clip_adapter.fewshot.features import FeatureCache, FeatureSet, dataset_labels, extract_image_features


class ViewTransform:
    """A small deterministic transform whose views differ: odd (index + view) flips, each view shifts."""

    def __init__(self, shift: float = 0.1) -> None:
        self.shift = shift
        self.description = f"test view transform, shift {shift}"

    def __call__(self, image: Image.Image, *, index: int = 0, view: int = 0) -> torch.Tensor:
        image = image.convert("RGB").resize((32, 32), Image.BICUBIC)
        if (index + view) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0  # [3, 32, 32]
        return (pixels - 0.5) / 0.25 + self.shift * view


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> datasets.Dataset:
    """Ten images of the four shape classes (a few per class), as a real imagefolder dataset."""
    from peft_clip_adapter.testing.tiny_models import write_shapes_dataset

    root = write_shapes_dataset(tmp_path_factory.mktemp("feature-shapes"), images_per_class=3)
    return datasets.load_dataset("imagefolder", data_dir=root, split="train").select(range(1, 11))


def _peft(path: str, adapt: str = "both", seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(CLIPModel.from_pretrained(path), CLIPAdapterConfig(adapt=adapt))
    with torch.no_grad():  # move the adapters away from their near-identity start
        for layer in adapter_layers(model).values():
            for module in (*layer.clip_adapter_down.values(), *layer.clip_adapter_up.values()):
                module.weight.mul_(3.0)
    return model


def _expected_features(clip: CLIPModel, dataset, transform, views: int) -> torch.Tensor:
    images = [load_image(value) for value in dataset["image"]]
    with torch.no_grad():
        return torch.stack(
            [
                clip.get_image_features(
                    pixel_values=torch.stack([transform(image, index=i, view=v) for i, image in enumerate(images)])
                ).pooler_output
                for v in range(views)
            ]
        )  # [V, N, D]


def test_feature_set_validates_and_flattens_view_major():
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    flat, labels = FeatureSet(features, torch.tensor([0, 1, 2])).flatten()
    assert torch.equal(flat[3], features[1, 0]) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match=r"float32 \[V, N, D\].*torch.float64"):
        FeatureSet(features.double(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"int64 \[N\]"):
        FeatureSet(features, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="features hold 3 images but labels hold 2"):
        FeatureSet(features, torch.tensor([0, 1]))


def test_extracts_raw_embeddings_of_every_view_in_row_order(tiny_clip_path, shapes):
    model = _peft(tiny_clip_path, "both").train()
    transform = ViewTransform()
    feature_set = extract_image_features(model, shapes, transform, views=3, batch_size=4)
    assert feature_set.features.shape == (3, 10, 32) and feature_set.features.dtype == torch.float32
    assert feature_set.labels.tolist() == shapes["label"]
    # Adapters disabled: CLIP's own visual_projection output.
    expected = _expected_features(CLIPModel.from_pretrained(tiny_clip_path), shapes, transform, 3)
    torch.testing.assert_close(feature_set.features, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(feature_set.features[0], feature_set.features[1])  # views differ
    assert model.training and all(not layer.disable_adapters for layer in adapter_layers(model).values())
    # A single-process Accelerator splits the rows and gathers them back: same features.
    accelerated = extract_image_features(model, shapes, transform, views=3, accelerator=Accelerator(cpu=True))
    torch.testing.assert_close(accelerated.features, feature_set.features, atol=1e-5, rtol=1e-5)


# Run by each of two gloo processes: extract then reload 9 rows (whole batches of 2: rows 0-5 and 6-8, each
# process with two DataLoader workers) and save what it got.
_WORKER = """
import sys, datasets, torch
from accelerate import Accelerator
from peft import get_peft_model
from transformers import CLIPModel
import peft_clip_adapter
from peft_clip_adapter.fewshot.features import FeatureCache
sys.path.insert(0, sys.argv[1])
from test_features import ViewTransform

model_path, data_dir, cache_dir, out_dir = sys.argv[2:]
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, "expected two processes"
dataset = datasets.load_dataset("imagefolder", data_dir=data_dir, split="train").select(range(9))
model = get_peft_model(CLIPModel.from_pretrained(model_path), peft_clip_adapter.CLIPAdapterConfig())
cache = FeatureCache(cache_dir)
first = cache.load_or_extract(
    model, dataset, ViewTransform(), views=2, batch_size=2, accelerator=accelerator, num_workers=2
)
again = cache.load_or_extract(model, dataset, ViewTransform(), views=2, accelerator=accelerator)
result = {"features": first.features, "reloaded": again.features, "hit": cache.last_hit}
torch.save(result, f"{out_dir}/rank{accelerator.process_index}.pt")
"""


@pytest.mark.slow
def test_two_processes_each_get_all_features_in_order(tiny_clip_path, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from peft_clip_adapter.testing.tiny_models import write_shapes_dataset

    data_dir = write_shapes_dataset(tmp_path / "images", images_per_class=3)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    with socket.socket() as probe:  # a free port, so that concurrent runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    arguments = [
        str(worker),
        os.path.dirname(__file__),
        tiny_clip_path,
        data_dir,
        str(tmp_path / "cache"),
        str(tmp_path),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, *arguments], check=True, timeout=300, env=environment, capture_output=True)

    dataset = datasets.load_dataset("imagefolder", data_dir=data_dir, split="train").select(range(9))
    expected = _expected_features(CLIPModel.from_pretrained(tiny_clip_path), dataset, ViewTransform(), 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes ran: the same batches then give the same bits
    try:
        one_process = extract_image_features(
            CLIPModel.from_pretrained(tiny_clip_path), dataset, ViewTransform(), views=2, batch_size=2, num_workers=0
        ).features
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["features"], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(result["features"], one_process)  # bitwise: 2 processes x 2 workers = 1 process
        assert torch.equal(result["reloaded"], result["features"]) and result["hit"] is True
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"views": 0}, "views=0 must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"image_column": "img"}, "img.*image.*label"),
        ({"label_column": "target"}, "target.*image.*label"),
    ],
)
def test_extraction_rejects_bad_arguments(tiny_clip, shapes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_image_features(tiny_clip, shapes, ViewTransform(), **kwargs)
    with pytest.raises(ValueError, match=match):
        FeatureCache("unused").load_or_extract(tiny_clip, shapes, ViewTransform(), **kwargs)


def test_extraction_rejects_bad_data_and_models(tiny_clip, tiny_clip_path, shapes, tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        extract_image_features(tiny_clip, shapes.select([]), ViewTransform())
    named = shapes.cast_column("label", datasets.Value("string"))
    with pytest.raises(ValueError, match=r"class indices >= 0, found '\d'.*class_encode_column\('label'\)"):
        extract_image_features(tiny_clip, named, ViewTransform())
    text_only = CLIPTextModelWithProjection.from_pretrained(tiny_clip_path)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection has no vision tower"):
        extract_image_features(text_only, shapes, ViewTransform())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    unreadable = datasets.Dataset.from_dict({"image": [str(broken)], "label": [0]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match="broken.png"):
        extract_image_features(tiny_clip, unreadable, ViewTransform())


def test_labels_must_be_class_indices():
    assert dataset_labels(datasets.Dataset.from_dict({"label": [3, 0]})).dtype == torch.int64
    with pytest.raises(ValueError, match="found -1.*unlabelled"):
        dataset_labels(datasets.Dataset.from_dict({"label": [0, -1]}))


def test_cache_reuses_features_without_running_the_backbone(tiny_clip_path, shapes, tmp_path):
    cache, transform = FeatureCache(tmp_path / "cache"), ViewTransform()
    model = _peft(tiny_clip_path)
    first = cache.load_or_extract(model, shapes, transform, views=2)
    assert cache.last_hit is False and cache.last_path.is_file()
    calls = []
    model.get_base_model().vision_model.register_forward_hook(lambda *args: calls.append(1))
    again = FeatureCache(tmp_path / "cache").load_or_extract(model, shapes, transform, views=2)
    assert calls == []
    assert torch.equal(again.features, first.features) and torch.equal(again.labels, first.labels)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [cache.last_path.name]  # no temp files left
    # Readable like any other file in a cache a team shares (the temporary file it was written to is 0600).
    umask = os.umask(0o022)
    os.umask(umask)
    assert cache.last_path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_every_ingredient_of_the_key_changes_it(tiny_clip_path, shapes):
    cache, transform = FeatureCache("unused"), ViewTransform()
    model = _peft(tiny_clip_path)
    key = cache.key(model, shapes, transform, views=2)
    # Same computation, same key: the plain base model, other adapter weights, another text tower.
    base = CLIPModel.from_pretrained(tiny_clip_path)
    assert cache.key(base, shapes, transform, views=2) == key
    assert cache.key(_peft(tiny_clip_path, seed=1), shapes, transform, views=2) == key
    with torch.no_grad():
        base.text_projection.weight.add_(1.0)
        base.logit_scale.add_(1.0)
    assert cache.key(base, shapes, transform, views=2) == key

    changed_weights = CLIPModel.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        changed_weights.vision_model.post_layernorm.bias.add_(1e-3)
    changed_config = CLIPModel.from_pretrained(tiny_clip_path)
    changed_config.config.vision_config.layer_norm_eps = 1e-3
    renamed = shapes.rename_column("image", "picture").rename_column("label", "target")
    others = [
        cache.key(changed_weights, shapes, transform, views=2),
        cache.key(changed_config, shapes, transform, views=2),
        cache.key(model, shapes.select(range(9)), transform, views=2),  # fewer rows
        cache.key(model, shapes.select(range(9, -1, -1)), transform, views=2),  # same rows, other order
        cache.key(model, renamed, transform, views=2, image_column="picture", label_column="target"),
        cache.key(model, shapes, ViewTransform(shift=0.2), views=2),
        cache.key(model, shapes, transform, views=3),
    ]
    assert len({key, *others}) == 1 + len(others)
    components = cache.key_components(
        model, renamed, transform, views=2, image_column="picture", label_column="target"
    )
    assert (components["image_column"], components["label_column"], components["views"]) == ("picture", "target", 2)


def test_transform_needs_a_description(tiny_clip, shapes):
    def transform(image, *, index=0, view=0):
        return torch.zeros(3, 32, 32)

    with pytest.raises(ValueError, match="function has no `description` string"):
        FeatureCache("unused").load_or_extract(tiny_clip, shapes, transform)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty"])
def test_damaged_cache_file_is_detected_and_recomputed(tiny_clip, shapes, tmp_path, caplog, damage):
    cache, transform = FeatureCache(tmp_path), ViewTransform()
    first = cache.load_or_extract(tiny_clip, shapes, transform)
    data = cache.last_path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "flip_byte": data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:]}
    cache.last_path.write_bytes(damaged.get(damage, b""))
    with caplog.at_level(logging.WARNING, logger="peft_clip_adapter.fewshot.features"):
        again = cache.load_or_extract(tiny_clip, shapes, transform)
    assert cache.last_hit is False and "is damaged" in caplog.text and cache.last_path.name in caplog.text
    assert torch.equal(again.features, first.features)
    # The file was rewritten whole: the next call is a hit again.
    assert torch.equal(cache.load_or_extract(tiny_clip, shapes, transform).features, first.features)
    assert cache.last_hit is True


def test_save_and_load_round_trip_and_a_missing_key_is_none(tmp_path):
    cache = FeatureCache(tmp_path / "new" / "folder")  # created on the first write
    assert cache.path("0" * 32).name == "image-features-" + "0" * 32 + ".safetensors"
    assert cache.load("0" * 32) is None
    feature_set = FeatureSet(torch.randn(2, 3, 4), torch.tensor([0, 1, 1]))
    assert cache.save("0" * 32, feature_set, {"views": 2}) == cache.path("0" * 32)
    loaded = cache.load("0" * 32)
    assert torch.equal(loaded.features, feature_set.features) and torch.equal(loaded.labels, feature_set.labels)
    assert cache.load("1" * 32) is None


def test_a_full_disk_names_the_cache_file_and_leaves_no_partial_file(tmp_path):
    # A file-size limit makes writes fail with EFBIG ("File too large"), as a full or quota-bound disk does.
    script = f"""
        import resource, signal, torch
        from peft_clip_adapter.fewshot.features import FeatureCache, FeatureSet
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        features = FeatureSet(torch.zeros(4, 100, 32), torch.zeros(100, dtype=torch.int64))  # 51 kB
        try:
            FeatureCache({str(tmp_path)!r}).save("0" * 32, features)
        except OSError as error:
            print(error)
    """
    output = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert output.returncode == 0, output.stderr
    assert "Could not write" in output.stdout and "image-features-" + "0" * 32 + ".safetensors" in output.stdout
    assert "File too large" in output.stdout
    assert os.listdir(tmp_path) == []


def test_an_interrupted_write_leaves_no_file_and_dead_runs_temporaries_are_removed(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    feature_set = FeatureSet(torch.zeros(1, 2, 4), torch.tensor([0, 1]))

    def interrupted(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("peft_clip_adapter.fewshot.features.save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cache.save("0" * 32, feature_set)
    assert os.listdir(tmp_path) == []
    # A run killed by SIGKILL cannot clean up; the next write beside the same file removes its temporary.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from peft_clip_adapter.atomic import temporary_prefix

    prefix = temporary_prefix(cache.path("0" * 32)).rsplit("-", 2)[0]
    (tmp_path / f"{prefix}-{dead.stdout.strip()}-abc").write_bytes(b"half a file")
    cache.save("0" * 32, feature_set)
    assert os.listdir(tmp_path) == [cache.path("0" * 32).name]


@pytest.mark.parametrize(
    ("adapt", "templates"), [("vision", ["a photo of a {}."]), ("both", ["a {}.", "itap of a {}."])]
)
def test_training_on_cached_features_equals_training_end_to_end(
    tiny_clip_path, tiny_processor, shapes, adapt, templates
):
    views, batch_size = 2, 6
    transform = build_train_transform(tiny_processor.image_processor, seed=0)
    classnames = shapes.features["label"].names
    order = torch.randperm(views * len(shapes), generator=torch.Generator().manual_seed(0))
    batches = order.split(batch_size)  # one epoch: 6, 6, 6 and 2 rows

    # (a) On cached features: the backbone ran once per image and view.
    cached_model = _peft(tiny_clip_path, adapt)
    features, labels = extract_image_features(cached_model, shapes, transform, views=views).flatten()
    head = CLIPAdapterClassifier.from_model(
        cached_model, encode_class_prompts(cached_model, tiny_processor, classnames, templates)
    )
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=2.0)
    for rows in batches:
        optimizer.zero_grad()
        F.cross_entropy(head(features[rows]), labels[rows]).backward()
        optimizer.step()

    # (b) End to end: both towers and the adapters run on every step, as in the reference trainer.
    model = _peft(tiny_clip_path, adapt)
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    images = [load_image(value) for value in shapes["image"]]
    prompts = [template.format(name) for name in classnames for template in templates]
    tokens = tiny_processor.tokenizer(prompts, padding=True, return_tensors="pt")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    for rows in batches:
        views_and_images = [divmod(int(row), len(shapes)) for row in rows]  # row = view * N + image
        pixels = torch.stack([transform(images[i], index=i, view=v) for v, i in views_and_images])  # [B, 3, H, W]
        targets = torch.tensor([shapes[i]["label"] for _, i in views_and_images])
        if len(templates) == 1:
            logits = model(**tokens, pixel_values=pixels).logits_per_image  # [B, C]
        else:
            text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)  # [C*T, D]
            text = F.normalize(text.reshape(len(classnames), len(templates), -1).mean(dim=1), dim=-1)  # [C, D]
            image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)  # [B, D]
            logits = model.get_base_model().logit_scale.exp() * image @ text.T  # [B, C]
        optimizer.zero_grad()
        F.cross_entropy(logits, targets).backward()
        optimizer.step()

    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    via_cache = {name: p for name, p in cached_model.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(via_cache) and len(trained) == (4 if adapt == "both" else 2)
    for name, weight in trained.items():
        assert (weight - start[name]).abs().max() > 1e-3, f"{name} barely moved; the comparison would be empty"
        torch.testing.assert_close(via_cache[name], weight, atol=1e-5, rtol=1e-5)
