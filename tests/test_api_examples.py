"""What the toolkit's and testbed's docstring examples used to show, kept as tests.

The docstrings are concise; the behaviour their examples demonstrated (mostly on tiny processors, models
and datasets) is checked here instead, one section per module.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, Siglip2ImageProcessorPil

from peft_clip_adapter.fewshot.inputs import transforms
from peft_clip_adapter.fewshot.inputs.transforms import (
    ImageTransform,
    ResizedCropTransform,
    ViewBox,
    build_eval_transform,
    build_train_transform,
    is_naflex_processor,
    move_model_inputs,
    stack_model_inputs,
)

SMALL = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


# --- fewshot.inputs.transforms -------------------------------------------------------------------------------


def test_check_index_names_the_bad_value():
    with pytest.raises(ValueError, match=r"view must be an integer >= 0, got -1\."):
        transforms.check_index("view", -1)
    with pytest.raises(ValueError, match="seed must be"):
        transforms.check_index("seed", True)


def test_a_subclass_of_image_transform_needs_call_and_description():
    class Gray(ImageTransform):
        description = "gray 8 px"

        def __call__(self, image, *, index=0, view=0):
            return torch.full((3, 8, 8), 0.5)

    assert Gray()(None).shape == (3, 8, 8)
    assert repr(Gray()) == "Gray(gray 8 px)"


def test_stack_and_move_model_inputs():
    view = {"pixel_values": torch.zeros(16, 192), "spatial_shapes": torch.tensor([2, 8])}
    stacked = stack_model_inputs([view] * 3)
    assert {name: tuple(value.shape) for name, value in stacked.items()} == {
        "pixel_values": (3, 16, 192),
        "spatial_shapes": (3, 2),
    }
    inputs = {"pixel_values": torch.zeros(1, 4), "spatial_shapes": torch.tensor([[2, 2]])}
    moved = move_model_inputs(inputs, "cpu", torch.bfloat16)
    assert moved["pixel_values"].dtype == torch.bfloat16
    assert moved["spatial_shapes"].dtype == torch.int64


def test_resized_crop_transform_views_boxes_and_scales():
    train = build_train_transform(CLIPImageProcessor(**SMALL), seed=0)
    assert isinstance(train, ResizedCropTransform)
    assert tuple(train.crops(Image.new("RGB", (64, 48)), index=0, views=[0, 1]).shape) == (2, 3, 32, 32)
    assert build_eval_transform(CLIPImageProcessor(crop_size={"height": 24, "width": 24})).output_size == (24, 24)

    eval_224 = build_eval_transform(CLIPImageProcessor())  # shortest edge 224, crop 224
    assert eval_224.view_box(4000, 3000, index=0, view=0).resized == (224, 298)
    assert round(eval_224.max_scale(4000, 3000), 2) == 13.39
    assert eval_224.decode(Image.new("RGB", (8, 6))).scale == 1
    decoded = eval_224.decode(Image.new("RGB", (448, 224)))
    box = eval_224.view_boxes(decoded, index=0, views=[0])[0]
    assert box.box == (0.0, 0.0, 448.0, 224.0)
    assert eval_224.render(decoded, box).size == (224, 224)
    assert ViewBox(box=(0.0, 0.0, 64.0, 48.0), resized=(32, 42), offset=(0, 5), flip=False).offset == (0, 5)


def test_normalise_uses_the_processor_mean_and_std():
    transform = build_eval_transform(CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    levels = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 2).expand(3, 1, 2)
    assert torch.equal(transform.normalise(levels)[0], torch.tensor([[-1.0, 1.0]]))


def test_eval_and_train_transforms_output_and_determinism():
    pixels = build_eval_transform(CLIPImageProcessor(**SMALL))(Image.new("RGB", (64, 48), "white"))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    transform = build_train_transform(CLIPImageProcessor(**SMALL), seed=0)
    image = Image.effect_noise((64, 48), 40)
    assert torch.equal(transform(image, index=3, view=1), transform(image, index=3, view=1))
    assert not torch.equal(transform(image, index=3, view=1), transform(image, index=3, view=2))


def test_naflex_transforms():
    assert is_naflex_processor(Siglip2ImageProcessorPil())
    assert not is_naflex_processor(CLIPImageProcessor())
    processor = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)
    inputs = build_train_transform(processor, seed=0)(Image.new("RGB", (64, 32)), index=0, view=1)
    assert {name: tuple(value.shape) for name, value in inputs.items()} == {
        "pixel_values": (16, 192),
        "pixel_attention_mask": (16,),
        "spatial_shapes": (2,),
    }
    eval_view = build_eval_transform(Siglip2ImageProcessorPil()).view_crop(64, 32, index=3, view=1)
    assert eval_view == ((0, 0, 64, 32), False)
    with pytest.raises(ValueError, match="does not make NaFlex inputs"):
        transforms.NaFlexTransform(CLIPImageProcessor())
