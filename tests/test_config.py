"""CLIPAdapterConfig: defaults, adapt versus target_modules, and a stable JSON round trip."""

from __future__ import annotations

import json

import pytest
from peft import PeftConfig

from peft_clip_adapter import PEFT_TYPE, CLIPAdapterConfig


def test_defaults_are_the_papers_visual_adapter():
    config = CLIPAdapterConfig()
    assert (config.ratio, config.reduction, config.adapt) == (0.2, 4, "vision")
    assert config.target_modules is None  # each model's pooled-embedding modules come from the table
    assert config.peft_type is PEFT_TYPE and config.peft_type == "CLIP_ADAPTER"
    assert config.task_type is None


@pytest.mark.parametrize("adapt", ["vision", "text", "audio", "both"])
def test_adapt_leaves_the_modules_to_the_model(adapt):
    config = CLIPAdapterConfig(adapt=adapt)
    assert (config.adapt, config.target_modules) == (adapt, None)


@pytest.mark.parametrize(
    "targets", [{"visual_projection", "text_projection"}, ("visual_projection", "text_projection", "text_projection")]
)
def test_explicit_target_modules_are_sorted_and_deduplicated(targets):
    config = CLIPAdapterConfig(target_modules=targets)
    assert config.target_modules == ["text_projection", "visual_projection"]
    assert config.adapt is None


@pytest.mark.parametrize(
    ("adapt", "targets"),
    [
        ("vision", ["visual_projection"]),
        ("text", ["text_projection"]),
        ("both", ["visual_projection", "text_projection"]),
    ],
)
def test_configs_saved_by_version_0_1_with_both_fields_mean_adapt(tmp_path, adapt, targets):
    # Version 0.1.0 wrote CLIP's projection names beside `adapt`; such files must keep loading. (It wrote every
    # field: one without `reduction` is refused, see tests/test_strict_loading.py.)
    saved = {"peft_type": "CLIP_ADAPTER", "adapt": adapt, "target_modules": targets, "ratio": 0.3, "reduction": 4}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = CLIPAdapterConfig.from_pretrained(tmp_path)
    assert (loaded.adapt, loaded.target_modules, loaded.ratio) == (adapt, None, 0.3)


def test_a_regex_target_is_kept_for_advanced_users():
    config = CLIPAdapterConfig(target_modules=r".*visual_projection")
    assert (config.target_modules, config.adapt) == (r".*visual_projection", None)


def test_whole_number_float_reduction_becomes_int():
    config = CLIPAdapterConfig(reduction=8.0, ratio=1)
    assert (config.reduction, type(config.reduction)) == (8, int)
    assert (config.ratio, type(config.ratio)) == (1.0, float)


def test_peft_type_cannot_be_overridden():
    assert CLIPAdapterConfig(peft_type="LORA").peft_type is PEFT_TYPE


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_json_round_trip(tmp_path, adapt):
    config = CLIPAdapterConfig(ratio=0.6, reduction=2, adapt=adapt, base_model_name_or_path="some/clip")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CLIP_ADAPTER"
    assert (saved["ratio"], saved["reduction"], saved["adapt"], saved["target_modules"]) == (0.6, 2, adapt, None)

    for loader in (CLIPAdapterConfig, PeftConfig):  # peft's own loader resolves our type too
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is CLIPAdapterConfig
        assert loaded.to_dict() == config.to_dict()


def test_json_is_stable_whatever_the_order_of_targets(tmp_path):
    texts = []
    for index, targets in enumerate(
        (["visual_projection", "text_projection"], ["text_projection", "visual_projection"])
    ):
        folder = tmp_path / str(index)
        CLIPAdapterConfig(target_modules=targets).save_pretrained(folder)
        texts.append((folder / "adapter_config.json").read_text())
    assert texts[0] == texts[1]
    assert '"target_modules": [\n    "text_projection",\n    "visual_projection"\n  ]' in texts[0]
