"""The adapter's exact output, checked against a hand computation from the saved weights.

``f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f`` on the projected embedding ``f`` of width ``d``,
with ``d`` read from the model (tiny CLIPs of width 24 and 48 here, not the fixtures' 32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoProcessor, CLIPModel, pipeline

from peft_clip_adapter import CLIPAdapterConfig, adapter_layers
from peft_clip_adapter.testing.tiny_models import build_tiny_clip

LABELS = ["red circle", "green square", "blue triangle", "yellow cross"]
INPUT_IDS = torch.tensor([[0, 5, 9, 12, 1], [0, 7, 3, 1, 1], [0, 4, 1, 1, 1]])  # 3 prompts, eos (1) first
KEYS = {"vision": "base_model.model.visual_projection", "text": "base_model.model.text_projection"}
BRANCHES = {"vision": ["vision"], "text": ["text"], "both": ["text", "vision"]}


@pytest.fixture(scope="module", params=[24, 48], ids=lambda d: f"d{d}")
def clip_path(request, tmp_path_factory) -> str:
    return build_tiny_clip(tmp_path_factory.mktemp(f"clip-d{request.param}"), projection_dim=request.param)


def hand_adapter(f: torch.Tensor, weights: dict[str, torch.Tensor], branch: str, ratio: float) -> torch.Tensor:
    """The paper's formula, written out with the saved weight matrices."""
    w1 = weights[f"{KEYS[branch]}.clip_adapter_down.weight"]  # [d/r, d]
    w2 = weights[f"{KEYS[branch]}.clip_adapter_up.weight"]  # [d, d/r]
    hidden = torch.clamp(f @ w1.T, min=0)  # [n, d/r]
    return ratio * torch.clamp(hidden @ w2.T, min=0) + (1 - ratio) * f  # [n, d]


@torch.no_grad()
def features(model, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "vision": model.get_image_features(pixel_values=pixel_values).pooler_output,  # [3, d]
        "text": model.get_text_features(input_ids=INPUT_IDS).pooler_output,  # [3, d]
    }


def clip_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # [images, texts]


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_outputs_equal_the_formula_on_the_saved_weights(clip_path, adapt, pixel_values, tmp_path):
    base = CLIPModel.from_pretrained(clip_path).eval()
    d = base.config.projection_dim
    expected = features(base, pixel_values)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path).eval(), CLIPAdapterConfig(ratio=0.3, adapt=adapt))
    model.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    for branch in BRANCHES[adapt]:
        assert weights[f"{KEYS[branch]}.clip_adapter_down.weight"].shape == (d // 4, d)
        expected[branch] = hand_adapter(expected[branch], weights, branch, 0.3)

    adapted = features(model, pixel_values)
    for branch in ("vision", "text"):
        torch.testing.assert_close(adapted[branch], expected[branch], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS, pixel_values=pixel_values).logits_per_image  # [3, 3]
    hand_logits = clip_logits(expected["vision"], expected["text"], base.logit_scale)
    torch.testing.assert_close(logits, hand_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base_logits = base(input_ids=INPUT_IDS, pixel_values=pixel_values).logits_per_image
    assert not torch.allclose(logits, base_logits)


@pytest.mark.parametrize(("adapt", "reduction"), [("vision", 4), ("text", 3), ("both", 8)])
def test_adapter_file_holds_only_the_adapter_tensors(clip_path, adapt, reduction, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), CLIPAdapterConfig(adapt=adapt, reduction=reduction))
    d = model.config.projection_dim
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    with safe_open(path, "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    expected = {}
    for branch in BRANCHES[adapt]:
        expected[f"{KEYS[branch]}.clip_adapter_down.weight"] = (d // reduction, d)
        expected[f"{KEYS[branch]}.clip_adapter_up.weight"] = (d, d // reduction)
    assert shapes == expected  # no base weights, no adapter name ("default") in the keys
    values = sum(rows * cols for rows, cols in shapes.values())
    assert values == len(BRANCHES[adapt]) * 2 * d * (d // reduction)
    header = int.from_bytes(Path(path).read_bytes()[:8], "little")
    assert os.path.getsize(path) == 8 + header + 4 * values  # float32, nothing else stored


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_only_the_adapter_trains(clip_path, adapt):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), CLIPAdapterConfig(adapt=adapt))
    d = model.config.projection_dim
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == len(BRANCHES[adapt]) * 2 * d * (d // 4)
    assert total == trainable + sum(p.numel() for p in CLIPModel.from_pretrained(clip_path).parameters())
    names = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert names == sorted(
        f"{KEYS[b]}.clip_adapter_{w}.default.weight" for b in BRANCHES[adapt] for w in ("down", "up")
    )
    # A training step reaches exactly those parameters.
    logits = model(input_ids=INPUT_IDS, pixel_values=torch.randn(3, 3, 32, 32)).logits_per_image  # [3, 3]
    F.cross_entropy(logits, torch.arange(3)).backward()
    assert sorted(name for name, p in model.named_parameters() if p.grad is not None) == names


def test_adapt_applies_the_formula_to_cached_embeddings(tiny_clip):
    layer = adapter_layers(get_peft_model(tiny_clip, CLIPAdapterConfig(ratio=0.7)))["vision"]
    f = torch.randn(5, 2, 32)  # any leading shape
    weights = {
        f"{KEYS['vision']}.clip_adapter_{w}.weight": getattr(layer, f"clip_adapter_{w}")["default"].weight
        for w in ("down", "up")
    }
    with torch.no_grad():
        torch.testing.assert_close(layer.adapt(f), hand_adapter(f, weights, "vision", 0.7))
    layer.enable_adapters(False)
    assert layer.adapt(f) is f


@pytest.mark.parametrize("through", ["peft model", "base model with adapter"])
def test_zero_shot_pipeline_sees_the_adapted_embeddings(tiny_clip_path, through, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_clip_path)
    base = CLIPModel.from_pretrained(tiny_clip_path).eval()
    model = get_peft_model(
        CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPAdapterConfig(adapt="both", ratio=0.8)
    )
    classify = pipeline(
        "zero-shot-image-classification",
        model=model if through == "peft model" else model.get_base_model(),
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    scores = {row["label"]: row["score"] for row in classify(image, candidate_labels=LABELS)}

    model.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    prompts = processor.tokenizer(
        [f"This is a photo of {label}." for label in LABELS], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        image_features = base.get_image_features(**processor.image_processor(image, return_tensors="pt")).pooler_output
        text_features = base.get_text_features(**prompts).pooler_output  # [4, 32]
    logits = clip_logits(
        hand_adapter(image_features, weights, "vision", 0.8),
        hand_adapter(text_features, weights, "text", 0.8),
        base.logit_scale,
    )
    expected = logits.softmax(dim=-1)[0]  # [4]
    base_scores = clip_logits(image_features, text_features, base.logit_scale).softmax(dim=-1)[0]
    assert [scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-6)
    assert not torch.allclose(expected, base_scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-adapter", "base-dtype-adapter"])
def test_half_precision_base(tiny_clip_path, pixel_values, dtype, autocast, tmp_path):
    reference = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPAdapterConfig(adapt="both"))
    reference.save_pretrained(tmp_path)
    weights = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))

    half = CLIPModel.from_pretrained(tiny_clip_path, dtype=dtype).eval()
    model = get_peft_model(half, CLIPAdapterConfig(adapt="both"), autocast_adapter_dtype=autocast)
    model.load_state_dict(
        {key: value for key, value in reference.state_dict().items() if "clip_adapter_" in key}, strict=False
    )
    adapter_dtype = torch.float32 if autocast else dtype  # peft upcasts half-precision adapters by default
    for layer in adapter_layers(model).values():
        assert layer.clip_adapter_down["default"].weight.dtype == adapter_dtype
        assert layer.base_layer.weight.dtype == dtype

    adapted = features(model, pixel_values.to(dtype))
    with model.disable_adapter():
        base = features(model, pixel_values.to(dtype))
    expected = features(reference, pixel_values)
    for branch in ("vision", "text"):
        assert adapted[branch].dtype == dtype
        if autocast:  # the adapter runs in float32 on the half-precision embedding, then casts back
            exact = hand_adapter(base[branch].float(), weights, branch, 0.2).to(dtype)
            torch.testing.assert_close(adapted[branch], exact, rtol=0, atol=0)
        torch.testing.assert_close(adapted[branch].float(), expected[branch], rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapter_follows_the_base_onto_the_gpu(tiny_clip_path, pixel_values):
    base = CLIPModel.from_pretrained(tiny_clip_path, dtype=torch.bfloat16).eval().to("cuda")
    model = get_peft_model(base, CLIPAdapterConfig(adapt="both"))
    layers = adapter_layers(model)
    assert all(layer.clip_adapter_up["default"].weight.device.type == "cuda" for layer in layers.values())
    out = features(model, pixel_values.to("cuda", torch.bfloat16))
    assert out["vision"].device.type == "cuda" and out["vision"].dtype == torch.bfloat16
    assert torch.isfinite(out["text"].float()).all()
