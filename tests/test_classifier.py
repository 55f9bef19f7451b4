"""The zero-shot classifier: prompt encoding, ensembles, CLIP's logit scale and the adapters it re-applies."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from peft_clip_adapter import CLIPAdapterConfig, adapter_layers
from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts
from peft_clip_adapter.testing.tiny_models import SHAPE_CLASSES

TEMPLATES = ["a photo of a {}.", "itap of a {}.", lambda name: f"art of the {name}."]


def _tokens(processor, prompts):
    return processor.tokenizer(prompts, padding=True, return_tensors="pt")


def _peft(tiny_clip, adapt, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt=adapt))
    # A fresh adapter is close to the identity; a visible perturbation makes the comparisons meaningful.
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for module in (*layer.clip_adapter_down.values(), *layer.clip_adapter_up.values()):
                module.weight.mul_(3.0)
    return model


def _end_to_end_logits(model, processor, pixel_values, classnames, templates):
    """Logits computed the long way: the full (adapted) model on every prompt and image."""
    prompts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    tokens = _tokens(processor, prompts)
    text = model.get_text_features(**tokens).pooler_output  # [C*T, D]
    text = F.normalize(text, dim=-1).reshape(len(classnames), len(templates), -1).mean(dim=1)
    text = F.normalize(text, dim=-1)  # [C, D]
    image = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)  # [N, D]
    return model.get_base_model().logit_scale.exp() * image @ text.T


def _raw_image_features(model, pixel_values):
    with model.disable_adapter(), torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values).pooler_output


def test_prompts_are_batched_and_padded_like_single_prompts(tiny_clip, tiny_processor):
    classnames = ["red_circle", "green square", "blue triangle"]
    encoded = encode_class_prompts(tiny_clip, tiny_processor, classnames, TEMPLATES, batch_size=4)
    assert encoded.shape == (3, 3, 32) and encoded.dtype == torch.float32
    for c, name in enumerate(["red circle", "green square", "blue triangle"]):
        for t, template in enumerate(TEMPLATES):
            prompt = template.format(name) if isinstance(template, str) else template(name)
            with torch.no_grad():
                alone = tiny_clip.get_text_features(**_tokens(tiny_processor, [prompt])).pooler_output[0]
            torch.testing.assert_close(encoded[c, t], alone, atol=1e-5, rtol=1e-5)
    in_one_batch = encode_class_prompts(tiny_clip, tiny_processor.tokenizer, classnames, TEMPLATES, batch_size=256)
    torch.testing.assert_close(in_one_batch, encoded, atol=1e-5, rtol=1e-5)


def test_prompts_skip_the_text_adapter_and_leave_flags_alone(tiny_clip, tiny_processor, tiny_clip_path):
    model = _peft(tiny_clip, "both").train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    encoded = encode_class_prompts(model, tiny_processor, SHAPE_CLASSES)
    base = CLIPModel.from_pretrained(tiny_clip_path)
    torch.testing.assert_close(encoded, encode_class_prompts(base, tiny_processor, SHAPE_CLASSES))
    text_tower = CLIPTextModelWithProjection.from_pretrained(tiny_clip_path)
    torch.testing.assert_close(encoded, encode_class_prompts(text_tower, tiny_processor, SHAPE_CLASSES))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training and all(not layer.disable_adapters for layer in adapter_layers(model).values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classnames": []}, "classnames is empty"),
        ({"classnames": ["cat", "dog", "cat"]}, r"duplicates \['cat'\]"),
        ({"classnames": ["red_circle", "dog", "red circle "]}, r"duplicates \['red circle ', 'red_circle'\]"),
        ({"batch_size": 0}, "batch_size=0 must be at least 1"),
        ({"templates": []}, "at least one prompt template"),
        ({"templates": "a photo"}, "no '{}' placeholder"),
        ({"templates": "a {} of {}"}, r"'a \{\} of \{\}' must hold exactly one '\{\}' .* Replacement index 1"),
        ({"templates": "a {} in {style}"}, r"no other fields .* 'style'"),
        ({"templates": "a {} }"}, r"literal braces as '\{\{' and '\}\}'"),
    ],
)
def test_prompt_encoding_rejects_bad_input(tiny_clip, tiny_processor, kwargs, match):
    arguments = {"classnames": ["cat", "dog"], **kwargs}
    with pytest.raises(ValueError, match=match):
        encode_class_prompts(tiny_clip, tiny_processor, **arguments)


def test_prompt_encoding_needs_a_text_tower(tiny_clip_path, tiny_processor):
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_path)
    with pytest.raises(ValueError, match=r"CLIPVisionModelWithProjection has no text tower .*it has vision"):
        encode_class_prompts(vision, tiny_processor, ["cat"])


def test_zero_shot_equals_clip_logits_per_image(tiny_clip, tiny_processor, pixel_values):
    head = CLIPAdapterClassifier.from_model(tiny_clip, encode_class_prompts(tiny_clip, tiny_processor, SHAPE_CLASSES))
    assert head.vision_adapter is None and head.text_adapter is None
    tokens = _tokens(tiny_processor, [f"a photo of a {name}." for name in SHAPE_CLASSES])
    with torch.no_grad():
        expected = tiny_clip(**tokens, pixel_values=pixel_values).logits_per_image  # [N, C]
        features = tiny_clip.get_image_features(pixel_values=pixel_values).pooler_output
        torch.testing.assert_close(head(features), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_logits_equal_the_full_peft_model(tiny_clip, tiny_processor, pixel_values, adapt):
    model = _peft(tiny_clip, adapt)
    head = CLIPAdapterClassifier.from_model(
        model, encode_class_prompts(model, tiny_processor, SHAPE_CLASSES, TEMPLATES)
    )
    assert (head.vision_adapter is not None) == (adapt != "text")
    assert (head.text_adapter is not None) == (adapt != "vision")
    with torch.no_grad():
        logits = head(_raw_image_features(model, pixel_values))
        expected = _end_to_end_logits(model, tiny_processor, pixel_values, SHAPE_CLASSES, TEMPLATES)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        # With one template the model's own forward gives the same numbers.
        single = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, tiny_processor, SHAPE_CLASSES))
        tokens = _tokens(tiny_processor, [f"a photo of a {name}." for name in SHAPE_CLASSES])
        forward = model(**tokens, pixel_values=pixel_values).logits_per_image
        torch.testing.assert_close(single(_raw_image_features(model, pixel_values)), forward, atol=1e-5, rtol=1e-5)
        # The adapter matters: the zero-shot logits differ.
        with model.disable_adapter():
            assert not torch.allclose(head(_raw_image_features(model, pixel_values)), logits, atol=1e-3)


def test_ensemble_is_the_renormalised_mean_of_normalised_prompts(tiny_clip):
    prompts = torch.tensor([[[3.0, 0.0], [0.0, 5.0]], [[-2.0, 0.0], [-1.0, 0.0]]])  # [C=2, T=2, D=2]
    head = CLIPAdapterClassifier(prompts, logit_scale=math.log(2.0))
    # Class 0: (1, 0) and (0, 1) average to (0.5, 0.5), renormalised to (1, 1) / sqrt(2); class 1: (-1, 0).
    expected = torch.tensor([[1 / math.sqrt(2), -1.0], [1 / math.sqrt(2), 0.0]])  # [D, C]
    torch.testing.assert_close(head.text_weights(), expected)
    # An image along (4, 0): cosines 1/sqrt(2) and -1, times exp(log 2) = 2.
    torch.testing.assert_close(head(torch.tensor([[4.0, 0.0]])), torch.tensor([[math.sqrt(2), -2.0]]))


def test_uses_the_models_own_logit_scale(tiny_clip, tiny_processor, pixel_values):
    with torch.no_grad():
        tiny_clip.logit_scale.fill_(math.log(7.0))
    head = CLIPAdapterClassifier.from_model(tiny_clip, encode_class_prompts(tiny_clip, tiny_processor, SHAPE_CLASSES))
    features = _raw_image_features(get_peft_model(tiny_clip, CLIPAdapterConfig()), pixel_values)
    cosines = F.normalize(features, dim=-1) @ head.text_weights()
    torch.testing.assert_close(head(features), 7.0 * cosines)
    assert head(features).abs().max() <= 7.0 + 1e-5  # not CLIP's usual 100
    assert "logit_scale" not in dict(head.named_parameters())


def test_only_adapter_parameters_train_and_the_text_encoder_never_reruns(tiny_clip, tiny_processor, pixel_values):
    model = _peft(tiny_clip, "both")
    head = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, tiny_processor, SHAPE_CLASSES))
    features = _raw_image_features(model, pixel_values)
    calls = []
    for tower in (model.get_base_model().text_model, model.get_base_model().vision_model):
        tower.register_forward_hook(lambda *args: calls.append(1))
    F.cross_entropy(head(features), torch.tensor([0, 1, 2])).backward()
    assert calls == []
    with_grad = {name for name, p in head.named_parameters() if p.grad is not None}
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == {
        f"{branch}_adapter.clip_adapter_{part}.default.weight"
        for branch in ("vision", "text")
        for part in ("down", "up")
    }


def test_training_the_head_trains_what_save_pretrained_saves(tiny_clip, tiny_processor, pixel_values, tmp_path):
    model = _peft(tiny_clip, "both")
    head = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, tiny_processor, SHAPE_CLASSES))
    features, labels = _raw_image_features(model, pixel_values), torch.tensor([0, 1, 2])
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    before = {name: p.detach().clone() for name, p in head.named_parameters() if p.requires_grad}
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    layers = adapter_layers(model)
    for branch in ("vision", "text"):
        for part in ("down", "up"):
            weight = getattr(layers[branch], f"clip_adapter_{part}")["default"].weight
            projection = "visual_projection" if branch == "vision" else "text_projection"
            assert torch.equal(saved[f"base_model.model.{projection}.clip_adapter_{part}.weight"], weight)
            assert not torch.equal(before[f"{branch}_adapter.clip_adapter_{part}.default.weight"], weight)


def test_classifier_rejects_bad_shapes(tiny_clip, tiny_clip_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="vision"))
    with pytest.raises(ValueError, match=r"must be \[C, T, D\].*embeddings\[:, None, :\]"):
        CLIPAdapterClassifier.from_model(model, torch.zeros(4, 32))
    with pytest.raises(ValueError, match="vision adapter works on width 32, but class_embeddings have width 16"):
        CLIPAdapterClassifier.from_model(model, torch.zeros(4, 1, 16))
    head = CLIPAdapterClassifier.from_model(model, torch.randn(4, 1, 32))
    with pytest.raises(ValueError, match=r"must be \[N, 32\] pooled embeddings, got shape \(2, 3, 32\)"):
        head(torch.zeros(2, 3, 32))
    vision = get_peft_model(CLIPVisionModelWithProjection.from_pretrained(tiny_clip_path), CLIPAdapterConfig())
    with pytest.raises(ValueError, match="has no `logit_scale`; pass logit_scale="):
        CLIPAdapterClassifier.from_model(vision, torch.randn(4, 1, 32))
    assert CLIPAdapterClassifier.from_model(vision, torch.randn(4, 1, 32), logit_scale=0.0).num_classes == 4


def test_check_class_prototypes_refuses_identical_and_lists_near_duplicates():
    from peft_clip_adapter.fewshot.classifier import check_class_prototypes

    base = torch.tensor([1.0, 0.0, 0.0])
    near = torch.tensor([1.0, 0.05, 0.0])  # cosine 0.9988 with base
    far = torch.tensor([0.0, 1.0, 0.0])
    prompts = torch.stack([base, near, far])[:, None, :]  # [C=3, T=1, D=3]
    assert check_class_prototypes(prompts, ["cat", "kitten", "car"]) == [
        ("cat", "kitten", pytest.approx(0.99875, abs=1e-5))
    ]
    assert check_class_prototypes(prompts, ["cat", "kitten", "car"], near_duplicate_cosine=0.9999) == []
    # Templates are averaged first: two classes that differ in one template only are still told apart.
    two_templates = torch.stack([torch.stack([base, far]), torch.stack([base, base]), torch.stack([far, far])])
    assert check_class_prototypes(two_templates, ["a", "b", "c"], near_duplicate_cosine=0.999) == []
    with pytest.raises(
        ValueError, match=r"Classes 'cat' and 'cat2'; 'dog' and 'dog2' have identical prompt embeddings"
    ):
        check_class_prototypes(torch.stack([base, 2 * base, far, far])[:, None, :], ["cat", "cat2", "dog", "dog2"])
    with pytest.raises(
        ValueError, match=r"class_embeddings must be \[C, T, D\] with C = 2 class names, got shape \(3, 1, 3\)"
    ):
        check_class_prototypes(prompts, ["cat", "dog"])
