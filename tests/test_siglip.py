"""SigLIP and SigLIP 2 through the toolkit, the zero-shot pipeline and the trainer, on tiny local folders.

SigLIP's text embedding is the LAST token's state, so prompts must be padded to the trained length (64),
and its logits are ``exp(logit_scale) * cos + logit_bias`` with sigmoid scores. SigLIP 2 NaFlex
(``Siglip2Model``) takes its processor's variable-resolution inputs; its few-shot pipeline and trainer
are tested in ``test_naflex.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoProcessor, Siglip2Model, SiglipModel, SiglipVisionModel, pipeline

from peft_clip_adapter import CLIPAdapterClassifier, CLIPAdapterConfig, adapter_layers, encode_class_prompts
from peft_clip_adapter.fewshot.classifier import prompt_padding
from peft_clip_adapter.fewshot.embeddings import frozen_image_embeddings
from peft_clip_adapter.testing.tiny_models import SHAPE_CLASSES, build_tiny_model

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

HEADS = {"vision": "base_model.model.vision_model.head", "text": "base_model.model.text_model.head"}
IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (24, 48), (30, 60, 200))]


@pytest.fixture(scope="module")
def siglip_path(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-siglip"), family="siglip")


def perturbed(model_class, path: str, adapt: str = "both"):
    """A PeftModel whose adapters visibly change the embeddings (a fresh adapter is near the identity)."""
    torch.manual_seed(0)
    model = get_peft_model(model_class.from_pretrained(path).eval(), CLIPAdapterConfig(adapt=adapt, ratio=0.8))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for part in (layer.clip_adapter_down, layer.clip_adapter_up):
                part["default"].weight.mul_(4.0)
    return model


def hand_adapter(f: torch.Tensor, weights: dict[str, torch.Tensor], module: str, ratio: float) -> torch.Tensor:
    """The paper's formula with the saved weights."""
    w1, w2 = weights[f"{module}.clip_adapter_down.weight"], weights[f"{module}.clip_adapter_up.weight"]
    return ratio * torch.clamp(torch.clamp(f @ w1.T, min=0) @ w2.T, min=0) + (1 - ratio) * f


def test_prompts_are_padded_to_the_trained_length(siglip_path):
    model, processor = SiglipModel.from_pretrained(siglip_path).eval(), AutoProcessor.from_pretrained(siglip_path)
    assert prompt_padding(model, processor) == {"padding": "max_length", "max_length": 64, "truncation": True}
    prompts = encode_class_prompts(model, processor, SHAPE_CLASSES)  # [C, 1, D]
    tokens = processor.tokenizer(
        [f"a photo of a {name}." for name in SHAPE_CLASSES], padding="max_length", max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.get_text_features(**tokens).pooler_output  # [C, D]
        shorter = model.get_text_features(**processor.tokenizer(
            [f"a photo of a {name}." for name in SHAPE_CLASSES], padding=True, return_tensors="pt"
        )).pooler_output  # fmt: skip
    assert torch.equal(prompts[:, 0], expected)
    assert not torch.allclose(shorter, expected, atol=1e-3)  # the last token moved: padding matters for SigLIP


def test_siglip2_processor_declares_its_text_length(siglip2_path):
    processor = AutoProcessor.from_pretrained(siglip2_path)
    assert prompt_padding(Siglip2Model.from_pretrained(siglip2_path), processor)["max_length"] == 64


@pytest.mark.parametrize("adapt", [None, "vision", "text", "both"])
def test_classifier_logits_equal_the_models_forward_with_the_bias(siglip_path, adapt):
    processor = AutoProcessor.from_pretrained(siglip_path)
    model = (
        SiglipModel.from_pretrained(siglip_path).eval()
        if adapt is None
        else perturbed(SiglipModel, siglip_path, adapt)
    )
    with torch.no_grad():
        base = model.get_base_model() if adapt else model
        base.logit_scale.fill_(2.0)
        base.logit_bias.fill_(-3.0)
    head = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, processor, SHAPE_CLASSES))
    assert head.sigmoid_scores and head.logit_bias.item() == -3.0
    inputs = processor(
        text=[f"a photo of a {name}." for name in SHAPE_CLASSES], images=IMAGES, padding="max_length",
        return_tensors="pt",
    )  # fmt: skip
    features = frozen_image_embeddings(model, inputs["pixel_values"])  # raw, before the vision adapter
    with torch.no_grad():
        expected = model(**inputs).logits_per_image  # [2, C]
        logits = head(features)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.scores(features), torch.sigmoid(expected), rtol=1e-5, atol=1e-6)


def test_cross_entropy_over_classes_ignores_the_bias():
    prompts, features, labels = torch.randn(3, 2, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    losses = [
        F.cross_entropy(CLIPAdapterClassifier(prompts, logit_scale=1.0, logit_bias=bias)(features), labels)
        for bias in (None, -10.0, 4.0)
    ]
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_zero_shot_pipeline_sees_the_adapted_embeddings(family, siglip_path, siglip2_path, tmp_path):
    path, model_class = (siglip_path, SiglipModel) if family == "siglip" else (siglip2_path, Siglip2Model)
    processor = AutoProcessor.from_pretrained(path)
    model = perturbed(model_class, path)
    classify = pipeline(
        "zero-shot-image-classification",
        model=model.get_base_model(),
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    scores = {row["label"]: row["score"] for row in classify(IMAGES[0], candidate_labels=list(SHAPE_CLASSES))}

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    base = model_class.from_pretrained(path).eval()
    prompts = processor.tokenizer(
        [f"This is a photo of {label}." for label in SHAPE_CLASSES],
        padding="max_length",
        max_length=64,
        truncation=True,
        return_tensors="pt",
    )  # fmt: skip (the pipeline's own template and SigLIP padding)
    with torch.no_grad():
        image = base.get_image_features(**processor.image_processor(IMAGES[0], return_tensors="pt")).pooler_output
        text = base.get_text_features(**prompts).pooler_output  # [C, D]
    image, text = hand_adapter(image, weights, HEADS["vision"], 0.8), hand_adapter(text, weights, HEADS["text"], 0.8)
    logits = base.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T + base.logit_bias
    expected = torch.sigmoid(logits)[0]  # SigLIP's scores: one sigmoid per label
    assert [scores[label] for label in SHAPE_CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)
    with model.disable_adapter():
        plain = {row["label"]: row["score"] for row in classify(IMAGES[0], candidate_labels=list(SHAPE_CLASSES))}
    assert plain != pytest.approx(scores, abs=1e-4)


def test_siglip2_naflex_inputs_reach_the_adapted_head(siglip2_path):
    processor = AutoProcessor.from_pretrained(siglip2_path)
    model = perturbed(Siglip2Model, siglip2_path, "vision")
    inputs = processor(images=IMAGES, return_tensors="pt")  # two aspect ratios: different spatial_shapes
    assert (
        inputs["pixel_values"].shape == (2, 256, 768)
        and inputs["spatial_shapes"][0].tolist() != inputs["spatial_shapes"][1].tolist()
    )
    raw = frozen_image_embeddings(model, **inputs)  # [2, D]
    with torch.no_grad():
        adapted = model.get_image_features(**inputs).pooler_output
    torch.testing.assert_close(adapted, adapter_layers(model)["vision"].adapt(raw), rtol=0, atol=0)


def test_siglip_vision_model_loads_the_trained_adapter(siglip_path, tmp_path):
    model = perturbed(SiglipModel, siglip_path, "vision")
    model.save_pretrained(tmp_path)
    vision = PeftModel.from_pretrained(SiglipVisionModel.from_pretrained(siglip_path).eval(), tmp_path)
    pixels = AutoProcessor.from_pretrained(siglip_path)(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
        assert torch.equal(vision(pixel_values=pixels).pooler_output, expected)


def test_trainer_runs_end_to_end_on_siglip(siglip_path, shapes_dir, tmp_path):
    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05, adapt="both")
    results = helpers.run_fewshot(helpers.trainer_args(siglip_path, shapes_dir, tmp_path, **flags)).results
    out = tmp_path / "out"
    assert json.loads((out / "all_results.json").read_text())["eval_accuracy"] == results["eval_accuracy"]
    assert (results["num_train_images"], results["num_classes"], results["adapt"]) == (16, 4, "both")
    saved = load_file(out / "adapter_model.safetensors")
    assert sorted(saved) == sorted(f"{HEADS[b]}.clip_adapter_{p}.weight" for b in HEADS for p in ("down", "up"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["adapt"], config["target_modules"]) == ("both", None)
    reloaded = PeftModel.from_pretrained(SiglipModel.from_pretrained(siglip_path).eval(), out)
    assert sorted(adapter_layers(reloaded)) == ["text", "vision"]
    assert os.path.getsize(out / "adapter_model.safetensors") < 20_000


def test_the_eval_transform_reproduces_siglips_image_processor(siglip_path):
    from peft_clip_adapter.fewshot.data import build_eval_transform

    processor = AutoProcessor.from_pretrained(siglip_path)
    image = Image.fromarray(torch.randint(0, 255, (75, 120, 3), dtype=torch.uint8).numpy())
    expected = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]  # [3, 32, 32]
    assert torch.equal(build_eval_transform(processor.image_processor)(image), expected)


def test_few_shot_classifier_shows_siglips_sigmoid_scores(siglip_path):
    from peft_clip_adapter import FewShotClassifier

    model = perturbed(SiglipModel, siglip_path, "both")
    classifier = FewShotClassifier(model, AutoProcessor.from_pretrained(siglip_path), list(SHAPE_CLASSES))
    logits = classifier.logits(IMAGES)  # [2, C]
    torch.testing.assert_close(classifier.scores(logits), torch.sigmoid(logits))
    ranked = classifier(IMAGES[0])
    assert [row["score"] for row in ranked] == sorted(torch.sigmoid(logits[0]).tolist(), reverse=True)
