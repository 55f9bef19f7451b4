"""SigLIP 2 NaFlex (``Siglip2Model``) through the few-shot toolkit and the trainer, on a tiny local folder.

A NaFlex processor sizes each image's patch grid from the image itself, so its inputs (``pixel_values``
``[patches, 3*p*p]``, ``pixel_attention_mask``, ``spatial_shapes``) must come from the processor AFTER the
augmentation: the eval transform is the processor, and a train view is the processor's output for the
paper's random crop (the same box and flip as the fixed-size train transform) and flip.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, Siglip2ImageProcessorPil, Siglip2Model

from peft_clip_adapter import adapter_layers
from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform, load_image
from peft_clip_adapter.fewshot.embeddings import frozen_image_embeddings
from peft_clip_adapter.fewshot.features import extract_image_features
from peft_clip_adapter.fewshot.inputs.transforms import NaFlexTransform, stack_model_inputs

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

INPUTS = ["pixel_attention_mask", "pixel_values", "spatial_shapes"]


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_processor(siglip2_path):
    return AutoProcessor.from_pretrained(siglip2_path).image_processor


def test_the_eval_transform_is_the_processor(siglip2_path, image_processor, tmp_path):
    transform = build_eval_transform(AutoProcessor.from_pretrained(siglip2_path))  # the whole processor works too
    assert isinstance(transform, NaFlexTransform)
    noise(120, 45, seed=1).save(tmp_path / "wide.jpg")
    shapes = []
    for image in (noise(40, 30, seed=0), noise(24, 96, seed=2), str(tmp_path / "wide.jpg")):
        expected = image_processor(images=load_image(image), return_tensors="pt")
        inputs = transform(image, index=5, view=3)  # eval views ignore the index and view
        assert sorted(inputs) == INPUTS
        assert all(torch.equal(inputs[name], expected[name][0]) for name in INPUTS)
        assert inputs["pixel_values"].shape == (256, 768) and inputs["pixel_values"].dtype == torch.float32
        assert inputs["pixel_attention_mask"].sum() == inputs["spatial_shapes"].prod()  # the image's patches
        shapes.append(inputs["spatial_shapes"].tolist())
    assert len({tuple(shape) for shape in shapes}) == 3  # each aspect ratio its own patch grid


def test_train_views_are_the_processor_on_the_papers_crop_and_flip(image_processor, tiny_processor):
    naflex = build_train_transform(image_processor, seed=4)
    fixed = build_train_transform(tiny_processor.image_processor, seed=4)  # CLIP's, 32 px: the same boxes
    image = noise(90, 60, seed=3)
    flips, grids = set(), set()
    for index, view in [(0, 0), (0, 1), (0, 2), (7, 0), (7, 1), (7, 2)]:
        box, flip = naflex.view_crop(90, 60, index=index, view=view)
        reference = fixed.view_box(90, 60, index=index, view=view)
        assert (tuple(float(value) for value in box), flip) == (reference.box, reference.flip)
        crop = image.crop(box)
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
        expected = image_processor(images=crop, resample=Image.Resampling.BICUBIC, return_tensors="pt")
        inputs = naflex(image, index=index, view=view)
        assert all(torch.equal(inputs[name], expected[name][0]) for name in INPUTS)
        assert all(torch.equal(inputs[name], naflex(image, index=index, view=view)[name]) for name in INPUTS)
        rows, columns = inputs["spatial_shapes"].tolist()  # the crop keeps its aspect ratio on the grid
        assert abs(columns / rows - (box[2] - box[0]) / (box[3] - box[1])) < 0.5
        flips.add(flip)
        grids.add((rows, columns))
    assert flips == {False, True} and len(grids) > 1


def test_the_cache_key_follows_every_setting_that_changes_the_inputs():
    def description(train: bool = True, seed: int = 0, **settings) -> str:
        processor = Siglip2ImageProcessorPil(**{"patch_size": 16, "max_num_patches": 256, **settings})
        return (build_train_transform(processor, seed=seed) if train else build_eval_transform(processor)).description

    assert description() == description()
    variants = [
        description(),
        description(train=False),
        description(seed=1),
        description(patch_size=8),
        description(max_num_patches=64),
        description(train=False, resample=Image.Resampling.BICUBIC),
        description(image_mean=[0.4, 0.5, 0.6]),
    ]
    assert len(set(variants)) == len(variants)
    assert '"max_num_patches": 64' in variants[4] and "Siglip2ImageProcessorPil" in variants[0]


def test_extraction_is_bitwise_alike_for_any_workers_and_device_views_fall_back(siglip2_path, image_processor, caplog):
    model = Siglip2Model.from_pretrained(siglip2_path).eval()
    sizes = [(40, 30), (24, 48), (64, 64), (70, 20)]  # patch grids of several shapes in one batch
    images = [noise(*sizes[row % 4], seed=row) for row in range(10)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": [row % 2 for row in range(10)]})
    dataset = dataset.cast_column("image", datasets.Image())
    transform = build_train_transform(image_processor, seed=2)
    run = dict(views=2, batch_size=4)
    features = {
        workers: extract_image_features(model, dataset, transform, num_workers=workers, **run) for workers in (0, 2)
    }
    assert features[0].features.shape == (2, 10, 32)
    assert torch.equal(features[0].features, features[2].features)

    row, view = 6, 1  # view 1 of row 6 is the model's embedding of the processor's inputs for that crop
    alone = frozen_image_embeddings(model, **stack_model_inputs([transform(images[row], index=row, view=view)]))
    torch.testing.assert_close(features[0].features[view, row], alone[0], rtol=1e-5, atol=1e-5)

    with caplog.at_level(logging.WARNING, logger="peft_clip_adapter.fewshot.inputs.loader"):
        forced = extract_image_features(model, dataset, transform, num_workers=0, views_on_device=True, **run)
    assert torch.equal(forced.features, features[0].features)
    assert "views_on_device=True: SigLIP 2 NaFlex views are made by the model's image processor" in caplog.text


def test_trainer_cached_and_end_to_end_train_the_same_adapter(siglip2_path, shapes_dir, tmp_path):
    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05)
    cached = helpers.run_fewshot(helpers.trainer_args(siglip2_path, shapes_dir, tmp_path / "cached", **flags)).results
    argv = helpers.trainer_args(siglip2_path, shapes_dir, tmp_path / "e2e", **flags, dataloader_num_workers=2)
    end_to_end = helpers.run_fewshot([*argv, "--end_to_end"]).results
    first = helpers.adapter_tensors(tmp_path / "cached" / "out")
    second = helpers.adapter_tensors(tmp_path / "e2e" / "out")
    assert sorted(first) == [
        f"base_model.model.vision_model.head.clip_adapter_{part}.weight" for part in ("down", "up")
    ]
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5)
    assert cached["train_loss_per_epoch"] == pytest.approx(end_to_end["train_loss_per_epoch"], rel=1e-4)
    assert cached["eval_accuracy"] == end_to_end["eval_accuracy"]
    assert (cached["num_train_images"], cached["num_eval_images"], cached["num_classes"]) == (16, 8, 4)
    saved = json.loads((tmp_path / "cached" / "out" / "all_results.json").read_text())
    assert saved["eval_accuracy"] == cached["eval_accuracy"] and saved["model_name_or_path"] == siglip2_path
    reloaded = PeftModel.from_pretrained(Siglip2Model.from_pretrained(siglip2_path), tmp_path / "cached" / "out")
    assert sorted(adapter_layers(reloaded)) == ["vision"]
