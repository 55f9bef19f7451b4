"""Save -> load reproduces outputs bit for bit: PeftModel, load_adapter, AutoPeftModel, Hub ids, single towers."""

from __future__ import annotations

import os

import pytest
import torch
from peft import AutoPeftModel, PeftModel, get_peft_model
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from peft_clip_adapter import CLIPAdapterConfig, CLIPAdapterPeftModel

INPUT_IDS = torch.tensor([[0, 5, 9, 12, 1], [0, 7, 3, 1, 1]])


@torch.no_grad()
def outputs(model, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    result = model(input_ids=INPUT_IDS, pixel_values=pixel_values)
    return {"image": result.image_embeds, "text": result.text_embeds, "logits": result.logits_per_image}


def assert_identical(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def adapter_requires_grad(model) -> set[bool]:
    return {p.requires_grad for name, p in model.named_parameters() if "clip_adapter_" in name}


@pytest.fixture
def saved(tiny_clip, tmp_path) -> tuple[PeftModel, str]:
    """A ``both`` adapter with ratio 0.5, saved to a folder."""
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both", ratio=0.5))
    model.save_pretrained(tmp_path / "adapter")
    return model, str(tmp_path / "adapter")


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_round_trip_into_a_fresh_model_is_bit_identical(tiny_clip, tiny_clip_path, pixel_values, adapt, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt=adapt, ratio=0.6, reduction=2))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path).eval(), tmp_path)
    assert isinstance(loaded, CLIPAdapterPeftModel)
    config, loaded_config = model.peft_config["default"], loaded.peft_config["default"]
    fields = ("ratio", "reduction", "adapt", "target_modules", "base_model_name_or_path")
    assert [getattr(loaded_config, name) for name in fields] == [getattr(config, name) for name in fields]
    assert_identical(outputs(loaded, pixel_values), outputs(model, pixel_values))
    with loaded.disable_adapter():  # and the fresh base underneath is untouched
        assert_identical(
            outputs(loaded, pixel_values), outputs(CLIPModel.from_pretrained(tiny_clip_path).eval(), pixel_values)
        )


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable_is_respected(saved, tiny_clip_path, is_trainable):
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved[1], is_trainable=is_trainable)
    assert adapter_requires_grad(loaded) == {is_trainable}
    assert loaded.get_nb_trainable_parameters()[0] == (2 * 2 * 32 * 8 if is_trainable else 0)
    assert not any(p.requires_grad for name, p in loaded.named_parameters() if "clip_adapter_" not in name)


def test_load_adapter_adds_a_second_adapter(saved, tiny_clip_path, pixel_values, tmp_path):
    other = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPAdapterConfig(ratio=0.9))
    other.save_pretrained(tmp_path / "other")
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path).eval(), saved[1])
    model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert sorted(model.peft_config) == ["default", "other"]
    assert adapter_requires_grad(model) == {False}  # load_adapter defaults to inference
    assert_identical(outputs(model, pixel_values), outputs(saved[0], pixel_values))
    model.set_adapter("other")
    assert_identical(outputs(model, pixel_values), outputs(other, pixel_values))


def test_several_adapters_save_and_load_together(saved, tiny_clip_path, pixel_values, tmp_path):
    model = saved[0]
    model.add_adapter("text_only", CLIPAdapterConfig(adapt="text", ratio=0.3))
    model.save_pretrained(tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both" / "text_only")) == [
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path).eval(), tmp_path / "both")
    loaded.load_adapter(str(tmp_path / "both" / "text_only"), adapter_name="text_only")
    for name in ("default", "text_only"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert_identical(outputs(loaded, pixel_values), outputs(model, pixel_values))


def test_auto_peft_model_finds_the_base_by_its_path(saved, tiny_clip_path, pixel_values):
    model, folder = saved
    assert model.peft_config["default"].base_model_name_or_path == tiny_clip_path
    loaded = AutoPeftModel.from_pretrained(folder)
    assert type(loaded.get_base_model()) is CLIPModel
    assert_identical(outputs(loaded.eval(), pixel_values), outputs(model, pixel_values))


def test_loading_from_a_hub_id(saved, tiny_clip_path, pixel_values, tmp_path):
    # Offline, a Hub id resolves through the local Hub cache exactly as after a download.
    repo = tmp_path / "cache" / "models--me--clip-adapter-x"
    saved[0].save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    base = CLIPModel.from_pretrained(tiny_clip_path).eval()
    loaded = PeftModel.from_pretrained(base, "me/clip-adapter-x", cache_dir=str(tmp_path / "cache"))
    assert_identical(outputs(loaded, pixel_values), outputs(saved[0], pixel_values))


def test_vision_adapter_moves_to_clip_vision_model_with_projection(tiny_clip, tiny_clip_path, pixel_values, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="vision", ratio=0.4))
    model.save_pretrained(tmp_path)
    vision = PeftModel.from_pretrained(CLIPVisionModelWithProjection.from_pretrained(tiny_clip_path).eval(), tmp_path)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixel_values).pooler_output  # [3, 32]
        assert torch.equal(vision(pixel_values=pixel_values).image_embeds, expected)
        with vision.disable_adapter():
            assert not torch.allclose(vision(pixel_values=pixel_values).image_embeds, expected)


def test_text_adapter_moves_to_clip_text_model_with_projection(tiny_clip, tiny_clip_path, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="text", ratio=0.4))
    model.save_pretrained(tmp_path)
    text = PeftModel.from_pretrained(CLIPTextModelWithProjection.from_pretrained(tiny_clip_path).eval(), tmp_path)
    with torch.no_grad():
        expected = model.get_text_features(input_ids=INPUT_IDS).pooler_output  # [2, 32]
        assert torch.equal(text(input_ids=INPUT_IDS).text_embeds, expected)
        with text.disable_adapter():
            assert not torch.allclose(text(input_ids=INPUT_IDS).text_embeds, expected)
