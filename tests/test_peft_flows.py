"""The usual peft flows on a CLIP-Adapter model: registration, several adapters, disable, delete, unload."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from peft import mapping as peft_mapping
from torch import nn
from transformers import CLIPModel

import peft_clip_adapter
from peft_clip_adapter import PEFT_TYPE, CLIPAdapterConfig, CLIPAdapterLayer, adapter_layers

INPUT_IDS = torch.tensor([[0, 5, 9, 12, 1], [0, 7, 3, 1, 1]])


@torch.no_grad()
def embeddings(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image = model.get_image_features(pixel_values=pixel_values).pooler_output  # [3, 32]
    text = model.get_text_features(input_ids=INPUT_IDS).pooler_output  # [2, 32]
    return image, text


def assert_same(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def trainable(model: nn.Module) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


@pytest.fixture
def two_adapters(tiny_clip) -> PeftModel:
    """``default`` adapts the image embedding (ratio 0.2), ``second`` both embeddings (ratio 0.9)."""
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.add_adapter("second", CLIPAdapterConfig(adapt="both", ratio=0.9))
    return model


def test_registration_entries_point_at_our_classes_and_collide_with_nothing():
    assert PEFT_TYPE.value not in {member.value for member in PeftType}
    assert PEFT_TYPE.value not in {member.name for member in PeftType}
    peft_clip_adapter.register()
    peft_clip_adapter.register()
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["CLIP_ADAPTER"] is CLIPAdapterConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["CLIP_ADAPTER"] is peft_clip_adapter.CLIPAdapterModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["CLIP_ADAPTER"] == "clip_adapter_"
    for peft_type in PeftType:  # peft's own methods are untouched
        if peft_type in peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
            assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is not CLIPAdapterConfig


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and peft
def test_reloading_the_package_is_harmless(tiny_clip_path, tmp_path):
    # In a fresh interpreter: a reload makes new classes, which would break the other tests' imports here.
    script = f"""
        import importlib
        import peft_clip_adapter, peft_clip_adapter  # importing twice is a no-op
        from peft import PeftModel, get_peft_model, mapping
        from transformers import CLIPModel
        from peft_clip_adapter import config, layer, model, peft_integration, peft_model
        for module in (peft_integration, config, layer, model, peft_model, peft_clip_adapter):
            importlib.reload(module)
        peft_clip_adapter.register()
        assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["CLIP_ADAPTER"] is peft_clip_adapter.CLIPAdapterConfig
        assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["CLIP_ADAPTER"] is peft_clip_adapter.CLIPAdapterModel
        assert sum(key == "CLIP_ADAPTER" for key in mapping.PEFT_TYPE_TO_CONFIG_MAPPING) == 1
        clip = CLIPModel.from_pretrained({tiny_clip_path!r})
        adapted = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig(adapt="both"))
        assert sorted(peft_clip_adapter.adapter_layers(adapted)) == ["text", "vision"]
        adapted.save_pretrained({str(tmp_path)!r})
        loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained({tiny_clip_path!r}), {str(tmp_path)!r})
        assert isinstance(loaded, peft_clip_adapter.CLIPAdapterPeftModel)
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_several_adapters_and_switching(two_adapters, tiny_clip_path, pixel_values):
    model = two_adapters
    base = embeddings(CLIPModel.from_pretrained(tiny_clip_path).eval(), pixel_values)
    first = embeddings(model, pixel_values)
    assert model.active_adapters == ["default"] and sorted(model.peft_config) == ["default", "second"]
    assert not torch.allclose(first[0], base[0]) and torch.equal(first[1], base[1])  # vision only
    assert trainable(model) == [
        "base_model.model.visual_projection.clip_adapter_down.default.weight",
        "base_model.model.visual_projection.clip_adapter_up.default.weight",
    ]

    model.set_adapter("second")
    second = embeddings(model, pixel_values)
    assert not torch.allclose(second[0], first[0]) and not torch.allclose(second[1], base[1])
    assert all(".second." in name for name in trainable(model)) and len(trainable(model)) == 4
    layers = adapter_layers(model)
    torch.testing.assert_close(second[0], layers["vision"].adapt(base[0]), rtol=0, atol=0)

    model.set_adapter("default")
    assert_same(embeddings(model, pixel_values), first)


def test_two_active_adapters_apply_in_order(two_adapters, tiny_clip_path, pixel_values):
    base_image = embeddings(CLIPModel.from_pretrained(tiny_clip_path).eval(), pixel_values)[0]
    layer = adapter_layers(two_adapters)["vision"]
    two_adapters.base_model.set_adapter(["default", "second"])
    both = embeddings(two_adapters, pixel_values)[0]
    layer.set_adapter("default")
    after_first = layer.adapt(base_image)
    layer.set_adapter("second")
    torch.testing.assert_close(both, layer.adapt(after_first), rtol=0, atol=0)


def test_disable_adapter_gives_exact_base_outputs(two_adapters, tiny_clip_path, pixel_values):
    base_model = CLIPModel.from_pretrained(tiny_clip_path).eval()
    base = embeddings(base_model, pixel_values)
    two_adapters.set_adapter("second")
    with two_adapters.disable_adapter():
        assert_same(embeddings(two_adapters, pixel_values), base)
        with torch.no_grad():
            logits = two_adapters(input_ids=INPUT_IDS, pixel_values=pixel_values).logits_per_image
            assert torch.equal(logits, base_model(input_ids=INPUT_IDS, pixel_values=pixel_values).logits_per_image)
    assert not torch.allclose(embeddings(two_adapters, pixel_values)[1], base[1])


def test_delete_adapter(two_adapters, pixel_values):
    before = embeddings(two_adapters, pixel_values)
    two_adapters.delete_adapter("second")
    assert list(two_adapters.peft_config) == ["default"]
    assert not any(".second." in key for key in two_adapters.state_dict())
    assert_same(embeddings(two_adapters, pixel_values), before)
    with pytest.raises(ValueError, match="second"):
        two_adapters.set_adapter("second")


def test_unload_returns_the_plain_model_with_base_outputs(two_adapters, tiny_clip_path, pixel_values):
    base = embeddings(CLIPModel.from_pretrained(tiny_clip_path).eval(), pixel_values)
    plain = two_adapters.unload()
    assert type(plain) is CLIPModel
    assert type(plain.visual_projection) is nn.Linear and type(plain.text_projection) is nn.Linear
    assert not any(isinstance(module, CLIPAdapterLayer) for module in plain.modules())
    assert not any("clip_adapter" in key for key in plain.state_dict())
    assert_same(embeddings(plain, pixel_values), base)


@pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload"])
def test_merging_is_refused_with_the_reason(two_adapters, pixel_values, method):
    before = embeddings(two_adapters, pixel_values)
    with pytest.raises(ValueError, match=r"cannot be merged.*ReLU.*unload\(\)"):
        getattr(two_adapters, method)()
    assert_same(embeddings(two_adapters, pixel_values), before)  # nothing changed


# -----------------------------------------------------------------------------
# peft's own tools and transformers' pipeline see the method as one of theirs


def test_model_status_names_the_method(two_adapters):
    assert two_adapters.get_model_status().peft_types == {"default": "CLIP_ADAPTER", "second": "CLIP_ADAPTER"}
    assert {status.module_type for status in two_adapters.get_layer_status()} == {"clip_adapter.CLIPAdapterLayer"}


def test_zero_shot_pipeline_takes_the_peft_model_without_an_error(two_adapters, tiny_processor, caplog):
    import numpy as np
    import transformers
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    labels = ["red circle", "green square"]
    parts = {"tokenizer": tiny_processor.tokenizer, "image_processor": tiny_processor.image_processor}
    transformers.utils.logging.enable_propagation()  # transformers' own handler bypasses caplog otherwise
    try:
        with caplog.at_level("WARNING"):
            classify = transformers.pipeline("zero-shot-image-classification", model=two_adapters, **parts)
            predictions = classify(image, candidate_labels=labels)
    finally:
        transformers.utils.logging.disable_propagation()
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []
    inner = transformers.pipeline("zero-shot-image-classification", model=two_adapters.get_base_model(), **parts)
    assert predictions == inner(image, candidate_labels=labels)


@pytest.mark.parametrize("name", ["adapter", "clip", "clip_adapter", "down", "up"])
def test_adapter_names_inside_the_parameter_prefix_load_exactly(tiny_clip, tiny_clip_path, tmp_path, name):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both"))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    model.save_pretrained(tmp_path)
    expected = {
        key.replace(".default.", "."): value for key, value in model.state_dict().items() if ".default." in key
    }

    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Adapter name '{name}' should not be contained in the prefix")
        result = loaded.load_adapter(tmp_path, name)
    # peft matched keys by substring: "down" is inside "clip_adapter_down", so every adapter was "missing".
    assert result.missing_keys == [] and result.unexpected_keys == []
    own = {key.replace(f".{name}.", "."): value for key, value in loaded.state_dict().items() if f".{name}." in key}
    assert own.keys() == expected.keys() and all(torch.equal(own[key], expected[key]) for key in expected)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), tmp_path, adapter_name=name)
    assert not [str(w.message) for w in caught if "Found missing adapter keys" in str(w.message)]


def test_every_way_of_building_the_model_gives_our_peft_model(tiny_clip_path, tmp_path):
    from peft import AutoPeftModel, LoraConfig

    from peft_clip_adapter import CLIPAdapterPeftModel

    def fresh() -> CLIPModel:
        return CLIPModel.from_pretrained(tiny_clip_path)

    built = get_peft_model(fresh(), CLIPAdapterConfig())
    built.save_pretrained(tmp_path)
    models = {
        "get_peft_model": built,
        "PeftModel(...)": PeftModel(fresh(), CLIPAdapterConfig()),
        "PeftModel.from_pretrained": PeftModel.from_pretrained(fresh(), tmp_path),
        "low_cpu_mem_usage": PeftModel.from_pretrained(fresh(), tmp_path, low_cpu_mem_usage=True),
        "AutoPeftModel.from_pretrained": AutoPeftModel.from_pretrained(tmp_path),
    }
    # torch's module-registration hook upgrades the PeftModel that takes our tuner as its base_model (see
    # model.py). If a peft release stops assigning it that way, this fails, instead of our model card and
    # atomic saves silently disappearing.
    assert {name: type(model).__name__ for name, model in models.items()} == dict.fromkeys(
        models, CLIPAdapterPeftModel.__name__
    )
    lora = get_peft_model(fresh(), LoraConfig(target_modules=["q_proj"]))
    assert type(lora) is PeftModel  # other methods are left alone
