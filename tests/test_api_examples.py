"""The toolkit's and testbed's public API on small inputs, one section per module.

The checks a reader of the API reference would try first: shapes, orientations, defaults and refusals of each
public function and class, on tiny processors, models and datasets built locally.
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


# --- fewshot.classifier --------------------------------------------------------------------------------------


def test_classifier_head_without_adapters_weights_logits_and_scores():
    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier

    head = CLIPAdapterClassifier(torch.randn(3, 2, 4), logit_scale=0.0)  # 3 classes, 2 templates
    weights = head.text_weights()
    assert weights.shape == (4, 3) and torch.allclose(weights.norm(dim=0), torch.ones(3))
    features = torch.randn(5, 4)
    assert head(features).shape == (5, 3)
    assert torch.equal(head.logits_of_adapted(features), head(features))  # no adapter: the same
    torch.testing.assert_close(head.scores(features).sum(dim=-1), torch.ones(5))  # softmax rows sum to 1
    with pytest.raises(ValueError, match=r"image_features must be \[N, 4\] pooled embeddings, got shape \(5, 8\)"):
        head(torch.randn(5, 8))


def test_classifier_from_a_peft_model_shares_both_adapters(tiny_clip, tiny_processor):
    from peft import get_peft_model

    from peft_clip_adapter import CLIPAdapterConfig
    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts

    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both"))
    prompts = encode_class_prompts(model, tiny_processor, ["red circle", "blue triangle"], ["a {}.", "itap of a {}."])
    assert prompts.shape == (2, 2, 32) and prompts.dtype == torch.float32
    head = CLIPAdapterClassifier.from_model(model, prompts)
    assert head(torch.randn(5, 32)).shape == (5, 2)
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 1024  # two 32 -> 8 -> 32 adapters


# --- fewshot.search ------------------------------------------------------------------------------------------


def test_batched_heads_shapes_and_refusals():
    from peft_clip_adapter.fewshot.features import FeatureSet
    from peft_clip_adapter.fewshot.recipe import TrainingRecipe
    from peft_clip_adapter.fewshot.search import BatchedAdapterHeads, SearchResult, train_batched

    init = (torch.rand(2, 8), torch.rand(8, 2))
    heads = BatchedAdapterHeads(torch.randn(3, 1, 8), 0.0, [0.2, 0.6], vision_init=init)
    assert heads(torch.randn(2, 5, 8)).shape == (2, 5, 3)  # [M, B, D] -> [M, B, C]
    assert {name: tuple(w.shape) for name, w in heads.adapter_weights(1).items()} == {
        "vision_down": (2, 8),
        "vision_up": (8, 2),
    }
    text = BatchedAdapterHeads(torch.randn(3, 2, 8), 0.0, [0.2], text_init=init)
    assert text.text_weights().shape == (1, 3, 8)
    features = FeatureSet(torch.randn(2, 6, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    rows = [torch.arange(6), torch.tensor([0, 1, 2])]
    assert train_batched(heads, features, rows, [0.1, 0.1], TrainingRecipe(num_train_epochs=3)).shape == (2, 3)
    with pytest.raises(ValueError, match="needs vision_init, text_init or both"):
        BatchedAdapterHeads(torch.randn(3, 1, 8), 0.0, [0.2])
    with pytest.raises(ValueError, match=r"vision_init must be \(down \[h, 8\], up \[8, h\]\)"):
        BatchedAdapterHeads(torch.randn(3, 1, 8), 0.0, [0.2], vision_init=(torch.rand(2, 4), torch.rand(4, 2)))
    with pytest.raises(ValueError, match="Every member needs at least one training row"):
        train_batched(heads, features, [torch.arange(6), torch.arange(0)], [0.1, 0.1], TrainingRecipe())
    fixed = SearchResult(ratio=0.2, learning_rate=2e-3, strategy="fixed", num_folds=0).to_dict()
    assert (fixed["ratio"], fixed["candidates"], fixed["summary"]) == (
        0.2,
        [],
        "fixed: ratio 0.2, learning rate 0.002",
    )


def test_search_needs_an_adapter():
    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier
    from peft_clip_adapter.fewshot.features import FeatureSet
    from peft_clip_adapter.fewshot.search import search_hyperparameters

    head = CLIPAdapterClassifier(torch.randn(3, 1, 8), 0.0)
    with pytest.raises(ValueError, match="The classifier has no adapter to search for"):
        search_hyperparameters(head, FeatureSet(torch.randn(1, 6, 8), torch.arange(6) % 3), torch.randn(6, 8))


# --- fewshot.inputs.loader -----------------------------------------------------------------------------------


def test_extraction_settings_batches_and_defaults():
    from peft_clip_adapter.fewshot.inputs.loader import (
        ExtractionSettings,
        cores_per_process,
        default_num_workers,
        device_views_possible,
        resolve_extraction,
        row_batches,
        split_batches,
    )

    assert ExtractionSettings(False, "bf16", torch.float32, 2).key_components() == {
        "views_made_on": "cpu",
        "autocast": "bfloat16",
        "features_dtype": "float32",
    }
    assert ExtractionSettings(False, "fp8", torch.float32, 0).autocast_dtype == torch.bfloat16
    assert resolve_extraction(len, torch.device("cpu"), num_workers=0, mixed_precision="bf16") == ExtractionSettings(
        views_on_device=False, mixed_precision="bf16", features_dtype=torch.float32, num_workers=0
    )
    assert not device_views_possible(len)
    assert cores_per_process() >= 1
    assert 1 <= default_num_workers() <= 8 and default_num_workers(num_chunks=2) == 0  # too few to pay a start-up
    assert split_batches(row_batches(5, 2)) == [[0, 1], [2, 3], [4]]


# --- fewshot.inputs.images -----------------------------------------------------------------------------------


def test_images_read_as_rgb_and_large_jpegs_at_reduced_scale():
    import io

    from peft_clip_adapter.fewshot.inputs.images import DecodedImage, load_image, load_image_draft, to_rgb

    assert to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    buffer = io.BytesIO()
    Image.new("P", (3, 2)).save(buffer, format="PNG")
    image = load_image({"path": "tiny.png", "bytes": buffer.getvalue()})
    assert (image.mode, image.size) == ("RGB", (3, 2))
    buffer = io.BytesIO()
    Image.new("RGB", (800, 600), "red").save(buffer, format="JPEG")
    decoded = load_image_draft(buffer.getvalue(), lambda width, height: height / 224)
    assert (decoded.image.size, decoded.scale, decoded.size) == ((400, 300), 2, (800, 600))
    assert isinstance(decoded, DecodedImage)
    assert load_image_draft(buffer.getvalue()).scale == 1  # no max_scale: full size


# --- fewshot.inputs.resample ---------------------------------------------------------------------------------


def test_axis_weights_and_render_views_on_a_ramp():
    from peft_clip_adapter.fewshot.inputs.resample import ViewBatch, axis_weights, render_views, supports_filter

    unsupported = getattr(Image.Resampling, "MKS2021", 103)  # Pillow 13's MKS kernel; Pillow 10-12 have none
    assert supports_filter(Image.Resampling.BICUBIC) and not supports_filter(unsupported)
    one = torch.ones(1)
    weights = axis_weights(
        torch.tensor([4]),
        0 * one,
        4 * one,
        torch.tensor([2]),
        torch.tensor([0]),
        torch.tensor([False]),
        out_size=2,
        in_max=4,
        resample=Image.Resampling.BOX,
    )
    assert torch.equal(weights[0], torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))

    image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4).expand(3, 4, 4).contiguous()
    views = [ViewBox((0.0, 0.0, 4.0, 4.0), (2, 2), (0, 0), False), ViewBox((0.0, 0.0, 4.0, 4.0), (2, 2), (0, 0), True)]
    batch = ViewBatch.collate([image], [views]).to("cpu")
    assert (tuple(batch.images.shape), batch.sizes.tolist(), tuple(batch.boxes.shape)) == (
        (1, 3, 4, 4),
        [[4, 4]],
        (1, 2, 4),
    )
    pixels = render_views(batch, output_size=(2, 2), resample=Image.Resampling.BOX)
    # 2 x 2 means of the 4 x 4 ramp, then the same mirrored
    assert pixels[:, 0, 0].tolist() == [[[3, 5], [11, 13]], [[5, 3], [13, 11]]]
    with pytest.raises(ValueError):
        render_views(batch, output_size=(2, 2), resample=unsupported)


# --- fewshot.recipe ------------------------------------------------------------------------------------------


def test_the_papers_recipe_steps_warm_up_and_schedule():
    from peft_clip_adapter.fewshot.recipe import TrainingRecipe, scheduled_learning_rate

    recipe = TrainingRecipe(num_train_epochs=4)
    assert (recipe.steps_per_epoch(100), recipe.steps_per_epoch(20)) == (3, 1)  # 3 full batches of 32; one of 20
    # 4 steps in all: one warm-up step at 1e-5, then the cosine from step 1 of 4
    assert [round(recipe.learning_rate_at(step, 2e-3, num_images=20), 6) for step in range(4)] == [
        1e-05,
        0.001707,
        0.001,
        0.000293,
    ]
    assert [scheduled_learning_rate(s, peak=1.0, warmup_steps=1, total_steps=4) for s in range(4)] == pytest.approx(
        [1e-05, 0.8535533905932737, 0.5, 0.14644660940672627]
    )
    assert (TrainingRecipe().steps_per_epoch(64), TrainingRecipe().steps_per_epoch(70)) == (2, 2)
    assert (TrainingRecipe().warmup_steps(96), TrainingRecipe(num_warmup_steps=0).warmup_steps(96)) == (3, 0)
    assert TrainingRecipe(num_train_epochs=2).learning_rate_at(1, 0.1, num_images=32) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        TrainingRecipe(lr_scheduler_type="step")


# --- fewshot.embeddings --------------------------------------------------------------------------------------


def test_frozen_runs_without_gradients_in_eval_mode_and_restores(tiny_clip):
    from torch import nn

    from peft_clip_adapter.fewshot.embeddings import (
        frozen,
        frozen_image_embeddings,
        frozen_text_embeddings,
        model_device,
        unwrap_model,
    )

    net = nn.Sequential(nn.Dropout(0.5)).train()
    with frozen(net) as inner:
        assert (inner.training, torch.is_grad_enabled()) == (False, False)
    assert net.training and torch.is_grad_enabled()
    assert unwrap_model(net) is net and model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert frozen_text_embeddings(tiny_clip, torch.tensor([[0, 5, 1]])).shape == (1, 32)
    assert frozen_image_embeddings(tiny_clip, torch.zeros(2, 3, 32, 32)).shape == (2, 32)


# --- fewshot.templates ---------------------------------------------------------------------------------------


def test_templates_by_name_filling_and_lists():
    from peft_clip_adapter.fewshot.templates import (
        DEFAULT_TEMPLATE,
        ENSEMBLE_TEMPLATES,
        as_template_list,
        clean_classname,
        fill_template,
        resolve_templates,
        templates_for,
    )

    assert templates_for("eurosat") == ["a centered satellite photo of {}."]
    assert len(templates_for("ensemble")) == 7 and templates_for("default") == [DEFAULT_TEMPLATE]
    with pytest.raises(ValueError, match=r"Unknown template set 'nope'; choose one of \['default', 'ensemble', "):
        templates_for("nope")
    assert clean_classname(" Annual_Crop ") == "Annual Crop"
    assert fill_template("{} texture.", "banded") == "banded texture."
    assert fill_template(str.upper, "banded") == "BANDED"
    with pytest.raises(ValueError, match="has no '{}' placeholder"):
        fill_template("a photo.", "cat")
    for bad in ("a {} and a {}.", "a {name} {}.", "a {} {."):
        with pytest.raises(ValueError, match="must hold exactly one"):
            fill_template(bad, "cat")
    assert as_template_list("{} texture.") == ["{} texture."]
    assert resolve_templates(None, "data/oxford_pets/train") == ["a photo of a {}, a type of pet."]
    assert resolve_templates([], "blobs") == [DEFAULT_TEMPLATE]
    assert resolve_templates(["ensemble"], "eurosat") == list(ENSEMBLE_TEMPLATES)
    assert resolve_templates(["a {}.", "an {}."]) == ["a {}.", "an {}."]
    assert as_template_list(("a {}.", "the {}.")) == ["a {}.", "the {}."]
    with pytest.raises(ValueError, match="Pass at least one prompt template"):
        as_template_list([])


# --- fewshot.logs --------------------------------------------------------------------------------------------


def test_log_progress_counts_and_logs_lines(caplog, monkeypatch):
    import logging
    import warnings

    from peft_clip_adapter.fewshot import logs

    monkeypatch.setattr(logs, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger=logs.logger.name):
        counter = logs.LogProgress(range(3), desc="Extracting features", unit="batches")
        assert list(counter) == [0, 1, 2] and counter.n == 3
        training = logs.progress(total=10, desc="Training", unit="steps")
        assert isinstance(training, logs.LogProgress)
        training.update(4)
        training.set_postfix(epoch=2, loss="0.4321")
        training.close()
        training.close()  # once
        silent = logs.progress(range(4), desc="Summing", enabled=False)
        assert sum(silent) == 6
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("Extracting features: 3/3 batches (100%)")
    assert lines[1].startswith("Training: 4/10 steps (40%)") and lines[1].endswith("epoch=2, loss=0.4321")
    assert len(lines) == 2  # the disabled counter said nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with logs.quiet_peft_wrapping():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
            warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["something else"]


# --- testing.scenes and testing.scene_tasks ------------------------------------------------------------------


def test_scenes_sample_render_caption_and_shift():
    from peft_clip_adapter.testing.scenes import (
        Scenes,
        apply_shift,
        caption_scenes,
        render_scenes,
        sample_scenes,
        vocabulary,
    )

    scenes = Scenes(*(torch.tensor([0, 1]) for _ in range(5)))
    assert (len(scenes), scenes.describe(1)) == (2, "large green striped square on the left")
    assert (
        Scenes(*(torch.tensor([v]) for v in (2, 2, 0, 2, 2))).describe(0)
        == "small blue checkered triangle on the right"
    )
    with pytest.raises(ValueError):
        Scenes(torch.tensor([0, 1]), *(torch.tensor([0]) for _ in range(4)))
    assert {"circle", "striped", "photo", "left"} <= set(vocabulary())
    drawn = sample_scenes(500, torch.Generator().manual_seed(0), exclude_pairs=[("circle", "red")])
    assert not bool(((drawn.shape == 0) & (drawn.colour == 0)).any())
    with pytest.raises(ValueError):
        sample_scenes(1, torch.Generator(), exclude_pairs=[("hexagon", "red")])
    generator = torch.Generator().manual_seed(0)
    images = render_scenes(sample_scenes(4, generator), generator)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert bool(apply_shift(images, "dusk", generator).float().mean() < images.float().mean())
    assert apply_shift(images, "none", generator) is images
    with pytest.raises(ValueError):
        apply_shift(images, "fog", generator)
    one = Scenes(*(torch.tensor([0]) for _ in range(5)))
    assert caption_scenes(one, torch.Generator().manual_seed(0)) == [
        "an image of a small red plain circle in the center."
    ]


def test_scene_tasks_render_and_write_image_folders(tmp_path):
    import datasets

    from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS, render_task_images, write_task_dataset

    task = SCENE_TASKS["dusk-pairs"]
    assert (len(task.classes), task.classes[0], task.constraints[0], task.shift) == (
        9,
        "red circle",
        {"shape": "circle", "colour": "red"},
        "dusk",
    )
    images, labels = render_task_images(task, 2, torch.Generator().manual_seed(0))
    assert images.shape == (18, 3, 32, 32) and labels.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    root = write_task_dataset(tmp_path, task, images_per_class=1)
    names = datasets.load_dataset("imagefolder", data_dir=root, split="train").features["label"].names
    assert names[:3] == ["blue circle", "blue square", "blue triangle"]
    with pytest.raises(ValueError):
        write_task_dataset(tmp_path / "empty", task, images_per_class=0)


# --- testing.tiny_models and testing.microclip ---------------------------------------------------------------


def test_tiny_models_and_shapes_load_like_hub_checkpoints_and_datasets(tmp_path):
    import datasets
    from transformers import AutoModel, CLIPModel

    from peft_clip_adapter.testing.microclip import PretrainingConfig, build_micro_clip
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip, build_tiny_model, write_shapes_dataset

    assert type(AutoModel.from_pretrained(build_tiny_model(tmp_path / "siglip", family="siglip"))).__name__ == (
        "SiglipModel"
    )
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "other", family="blip")
    assert CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "clip")).config.projection_dim == 32
    root = write_shapes_dataset(tmp_path / "shapes", images_per_class=2)
    names = datasets.load_dataset("imagefolder", data_dir=root, split="train").features["label"].names
    assert names == ["blue triangle", "green square", "red circle", "yellow cross"]
    with pytest.raises(ValueError):
        write_shapes_dataset(tmp_path / "bad", classes=["purple circle"])
    assert PretrainingConfig().projection_dim == 64
    path = build_micro_clip(tmp_path / "micro", PretrainingConfig(steps=2, batch_size=8))
    assert CLIPModel.from_pretrained(path).config.projection_dim == 64
    with pytest.raises(ValueError, match="PretrainingConfig needs"):
        PretrainingConfig(batch_size=1)
