"""Every bad input of the core method fails early with a ValueError that names the value and the fix."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import peft.peft_model
import pytest
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertModel, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModel

from peft_clip_adapter import CLIPAdapterConfig
from peft_clip_adapter.testing.tiny_models import build_tiny_clip

FILES = ["README.md", "adapter_config.json", "adapter_manifest.json", "adapter_model.safetensors"]


@pytest.fixture
def saved(tiny_clip, tmp_path) -> Path:
    """A folder holding a saved vision adapter for the tiny CLIP (d = 32)."""
    get_peft_model(tiny_clip, CLIPAdapterConfig()).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# --- config values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.5, math.inf, math.nan])
def test_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\].*got " + str(ratio)):
        CLIPAdapterConfig(ratio=ratio)


@pytest.mark.parametrize(("ratio", "kind"), [(True, "bool"), ("0.2", "str"), (None, "NoneType")])
def test_ratio_of_the_wrong_type(ratio, kind):
    with pytest.raises(ValueError, match=rf"ratio must be a number in \[0, 1\], got .* \({kind}\)"):
        CLIPAdapterConfig(ratio=ratio)


@pytest.mark.parametrize("reduction", [0, -4])
def test_reduction_below_one(reduction):
    with pytest.raises(ValueError, match=rf"reduction must be >= 1 .*got {reduction}"):
        CLIPAdapterConfig(reduction=reduction)


@pytest.mark.parametrize(("reduction", "kind"), [(2.5, "float"), ("4", "str"), (True, "bool")])
def test_reduction_not_a_whole_number(reduction, kind):
    with pytest.raises(ValueError, match=rf"reduction must be a whole number >= 1 .*\({kind}\)"):
        CLIPAdapterConfig(reduction=reduction)


def test_reduction_larger_than_the_projection_width_names_both(tiny_clip):
    with pytest.raises(ValueError, match=r"reduction=33 is larger than the embedding width d=32.*\[1, 32\]"):
        get_peft_model(tiny_clip, CLIPAdapterConfig(reduction=33))
    # d itself is the largest allowed reduction: a bottleneck of width 1
    get_peft_model(tiny_clip, CLIPAdapterConfig(reduction=32))


def test_unsupported_task_type():
    with pytest.raises(ValueError, match=r"task_type='FEATURE_EXTRACTION'.*Leave task_type=None"):
        CLIPAdapterConfig(task_type="FEATURE_EXTRACTION")


def test_unknown_branch():
    with pytest.raises(ValueError, match=r"adapt must be one of \['audio', 'both', 'text', 'vision'\].*got 'image'"):
        CLIPAdapterConfig(adapt="image")


def test_adapt_and_target_modules_together():
    with pytest.raises(ValueError, match=r"Pass either adapt='text' or target_modules=\['visual_projection'\], not"):
        CLIPAdapterConfig(adapt="text", target_modules=["visual_projection"])


@pytest.mark.parametrize("targets", [[], [3], ["visual_projection", None]])
def test_malformed_target_modules(targets):
    with pytest.raises(ValueError, match="target_modules must be a non-empty list of module names"):
        CLIPAdapterConfig(target_modules=targets)


def test_all_linear_is_refused():
    with pytest.raises(ValueError, match=r"'all-linear' would wrap every attention.*adapt='vision'"):
        CLIPAdapterConfig(target_modules="all-linear")


# --- targets on a model -------------------------------------------------------------------------------


def test_target_matching_nothing_lists_the_pooled_embedding_modules(tiny_clip):
    with pytest.raises(
        ValueError,
        match=r"\['image_projection'\] matches no module of CLIPModel.*\['text_projection', 'visual_projection'\]",
    ):
        get_peft_model(tiny_clip, CLIPAdapterConfig(target_modules=["image_projection"]))


def test_branch_missing_from_a_single_tower_model(tiny_clip_path):
    text_model = CLIPTextModelWithProjection.from_pretrained(tiny_clip_path)
    with pytest.raises(
        ValueError,
        match=r"CLIPTextModelWithProjection has no vision tower .*; it has text \('text_projection'\)\..*"
        r"Use adapt='text' / 'both'",
    ):
        get_peft_model(text_model, CLIPAdapterConfig(adapt="vision"))


def test_an_audio_branch_asked_of_an_image_model(tiny_clip):
    with pytest.raises(
        ValueError,
        match=r"CLIPModel has no audio tower .*; it has vision \('visual_projection'\) and text \('text_projection'\)",
    ):
        get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="audio"))
    assert not any("clip_adapter" in name for name, _ in tiny_clip.named_modules())


@pytest.mark.parametrize(
    "targets",
    [["q_proj"], r".*self_attn\.(q|k|v)_proj", ["visual_projection", "fc1"], "vision_model.post_layernorm"],
)
def test_per_token_and_inner_layers_are_refused(tiny_clip, targets):
    with pytest.raises(
        ValueError,
        match=r"matches '.*(proj|fc1|layernorm)' \((Linear|LayerNorm)\), which does not output a tower's final pooled "
        r"embedding.*CLIPModel's pooled-embedding modules: vision \('visual_projection'\)",
    ):
        get_peft_model(tiny_clip, CLIPAdapterConfig(target_modules=targets))
    assert not any("clip_adapter" in name for name, _ in tiny_clip.named_modules())  # nothing was injected


def tiny_bert() -> BertModel:
    return BertModel(
        BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )


@pytest.mark.parametrize("make_model", [tiny_bert, "clip_vision"], ids=["BertModel", "CLIPVisionModel"])
def test_model_without_a_known_pooled_embedding_module(make_model, tiny_clip_path):
    model = CLIPVisionModel.from_pretrained(tiny_clip_path) if make_model == "clip_vision" else make_model()
    with pytest.raises(
        ValueError,
        match=rf"{type(model).__name__} has no vision tower with a pooled embedding known to CLIP-Adapter; it has no "
        "pooled-embedding module of a supported dual encoder. Supported model classes",
    ):
        get_peft_model(model, CLIPAdapterConfig())


# --- loading ------------------------------------------------------------------------------------------


def test_loading_into_a_model_of_another_width_names_both_widths(saved, tmp_path):
    narrow = CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "d24", projection_dim=24))
    with pytest.raises(
        ValueError, match=r"trained for an embedding width d=32 .* this model's embedding width is d=24"
    ):
        PeftModel.from_pretrained(narrow, saved)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        data = b""
    elif how == "half":
        data = data[: len(data) // 2]
    elif how == "last bytes":
        data = data[:-3]
    elif how == "header length":
        data = (2**40).to_bytes(8, "little") + data[8:]
    elif how == "header bytes":
        data = data[:8] + b"\xff\xfe{not json" + data[18:]
    path.write_bytes(data)


DAMAGE = {
    "empty": "truncated .*not even a header",
    "half": "truncated or corrupted",
    "last bytes": "truncated or corrupted: its tensors need",
    "header length": "header claims 1099511627776 bytes",
    "header bytes": "corrupted header",
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_weights_file(saved, tiny_clip_path, how):
    damage(saved / "adapter_model.safetensors", how)
    match = rf"adapter_model\.safetensors (is|has a) .*{DAMAGE[how]}.*Save the adapter again"
    with pytest.raises(ValueError, match=match):
        CLIPAdapterConfig.from_pretrained(saved)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)


def test_damaged_weights_in_load_adapter(saved, tiny_clip_path, tmp_path):
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)
    damage(saved / "adapter_model.safetensors", "half")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        model.load_adapter(str(saved), adapter_name="second")
    assert list(model.peft_config) == ["default"]


def test_damaged_weights_from_the_hub_cache(saved, tiny_clip_path, tmp_path):
    # No local folder to check first: the download is read by safetensors, whose error we translate.
    repo = tmp_path / "cache" / "models--me--broken"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    os.rename(saved, repo / "snapshots" / ("0" * 40))
    damage(repo / "snapshots" / ("0" * 40) / "adapter_model.safetensors", "half")
    with pytest.raises(
        ValueError, match=r"me--broken.*adapter_model\.safetensors is truncated or corrupted.*download it"
    ):
        PeftModel.from_pretrained(
            CLIPModel.from_pretrained(tiny_clip_path), "me/broken", cache_dir=str(tmp_path / "cache")
        )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ratio": "abc"}, r"ratio must be a number in \[0, 1\], got 'abc' \(str\)"),
        ({"ratio": 2}, r"ratio must be in \[0, 1\]"),
        ({"reduction": "4"}, r"reduction must be a whole number >= 1 .*got '4' \(str\)"),
        ({"target_modules": 5}, "target_modules must be a non-empty list"),
        ({"adapt": "image"}, "adapt must be one of"),
        ({"task_type": "CAUSAL_LM"}, "task_type='CAUSAL_LM'"),
    ],
)
def test_config_file_with_wrong_values(saved, tiny_clip_path, changes, match):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        CLIPAdapterConfig.from_pretrained(saved)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)


@pytest.mark.parametrize(
    ("peft_type", "match"),
    [
        ("FOO", r"has peft_type='FOO', which is not a registered PEFT method\. Fix the spelling"),
        ("clip_adapter", r"has peft_type='clip_adapter', .* \(did you mean 'CLIP_ADAPTER'\?\)"),
        ("LORA", r"has peft_type='LORA'; a CLIP-Adapter config has peft_type='CLIP_ADAPTER'"),
        (None, r'has no "peft_type".*add "peft_type": "CLIP_ADAPTER"'),
    ],
)
def test_config_file_of_another_method(saved, peft_type, match):
    edit_config(saved, peft_type=peft_type)
    with pytest.raises(ValueError, match=match):
        CLIPAdapterConfig.from_pretrained(saved)


def test_config_file_that_is_not_json(saved):
    (saved / "adapter_config.json").write_text('{"ratio": 0.2,')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        CLIPAdapterConfig.from_pretrained(saved)


def test_unregistered_peft_type_is_named_by_peft_model_from_pretrained(saved, tiny_clip_path):
    # peft resolves peft_type itself, before any method code runs; its reader now explains the value.
    edit_config(saved, peft_type="FOO")
    with pytest.raises(ValueError, match=r"has peft_type='FOO', which is not a registered PEFT method"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)


# --- saving -------------------------------------------------------------------------------------------


def failing_save(tensors, filename: str, *args, **kwargs) -> None:
    Path(filename).write_bytes(b"half a file")  # what a crash midway leaves behind
    raise OSError("disk full")


def test_failed_save_keeps_the_older_adapter_intact(saved, tiny_clip_path, monkeypatch):
    before = snapshot(saved)
    assert sorted(before) == FILES
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(adapt="both", ratio=0.7))
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert snapshot(saved) == before
    assert sorted(os.listdir(saved.parent)) == ["adapter"]  # no staging folder left behind


def test_failed_model_card_leaves_no_files(tiny_clip, tmp_path, monkeypatch):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())

    def broken_card(self, output_dir):
        raise RuntimeError("card failed")

    monkeypatch.setattr(type(model), "create_or_update_model_card", broken_card)
    with pytest.raises(RuntimeError, match="card failed"):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []  # the weights written before the failure never reached "new"


def test_save_into_a_file(tiny_clip, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match=r"save_directory=.*taken' is a file; pass a folder"):
        get_peft_model(tiny_clip, CLIPAdapterConfig()).save_pretrained(tmp_path / "taken")


def test_a_tower_built_without_its_pooling_head_names_where_it_would_be():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    headless = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8, vision_use_head=False,
        )
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"SiglipVisionModel has no vision tower .* \(a SiglipVisionModel pools it in 'head', which this model "
        r"lacks\); it has no pooled-embedding module",
    ):
        get_peft_model(headless, CLIPAdapterConfig())


def test_two_dual_encoders_in_one_model_make_a_branch_ambiguous(tiny_clip_path):
    from torch import nn

    pair = nn.ModuleDict(
        {"a": CLIPModel.from_pretrained(tiny_clip_path), "b": CLIPModel.from_pretrained(tiny_clip_path)}
    )
    with pytest.raises(ValueError, match=r"ModuleDict holds two vision towers \('a.visual_projection' and 'b.vis"):
        get_peft_model(pair, CLIPAdapterConfig())
    # target_modules chooses among the pooled-embedding modules
    model = get_peft_model(pair, CLIPAdapterConfig(target_modules=["b.visual_projection"]))
    assert [name for name, _ in model.named_modules() if name.endswith("clip_adapter_down")] == [
        "base_model.model.b.visual_projection.clip_adapter_down"
    ]


def test_a_single_tower_adapter_saved_with_both_cannot_tell_its_tower(tiny_clip_path, tmp_path):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 16},
    )
    SiglipModel(config).save_pretrained(tmp_path / "model")
    vision = SiglipVisionModel.from_pretrained(tmp_path / "model")
    get_peft_model(vision, CLIPAdapterConfig(adapt="both")).save_pretrained(tmp_path / "both")
    with pytest.raises(ValueError, match=r"The checkpoint has no weights for .*vision_model\.head.*other towers"):
        PeftModel.from_pretrained(SiglipModel.from_pretrained(tmp_path / "model"), tmp_path / "both")
    # Saved with its branch named, the same adapter moves to the full model.
    vision = SiglipVisionModel.from_pretrained(tmp_path / "model")
    get_peft_model(vision, CLIPAdapterConfig(adapt="vision")).save_pretrained(tmp_path / "vision")
    loaded = PeftModel.from_pretrained(SiglipModel.from_pretrained(tmp_path / "model"), tmp_path / "vision")
    assert [name for name, _ in loaded.named_modules() if name.endswith("clip_adapter_down")] == [
        "base_model.model.vision_model.head.clip_adapter_down"
    ]
