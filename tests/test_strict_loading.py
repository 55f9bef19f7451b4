"""Loading is strict: every bad config, weights file or name fails with a ValueError naming the file, the key and
the fix, through every load path (PeftModel.from_pretrained, load_adapter, AutoPeftModel, the config loaders), and
nothing that fails the file checks touches the base model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from peft_clip_adapter import CLIPAdapterConfig, CLIPAdapterLayer
from peft_clip_adapter.manifest import MANIFEST_NAME

DOWN = "base_model.model.visual_projection.clip_adapter_down.weight"
UP = "base_model.model.visual_projection.clip_adapter_up.weight"


@pytest.fixture(scope="module")
def saved_once(tiny_clip_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(ratio=0.6)).save_pretrained(folder)
    return folder


@pytest.fixture
def saved(saved_once, tmp_path) -> Path:
    """A saved vision adapter (d = 32, reduction 4) of the tiny CLIP, to damage."""
    return Path(shutil.copytree(saved_once, tmp_path / "adapter"))


def foreign(folder: Path) -> Path:
    """Drop the manifest: the folder now looks like one written by another tool, checked file by file only."""
    (folder / MANIFEST_NAME).unlink()
    return folder


def write_config(folder: Path, content: str | bytes) -> None:
    path = foreign(folder) / "adapter_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    write_config(folder, json.dumps(config))


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(foreign(folder) / "adapter_model.safetensors"))


def is_wrapped(model) -> bool:
    return any(isinstance(module, CLIPAdapterLayer) for module in model.modules())


def load_paths(tiny_clip_path: str):
    """Each public way to load a saved adapter, as ``(name, load(folder))``."""

    def peft_model(folder):
        base = CLIPModel.from_pretrained(tiny_clip_path)
        try:
            return PeftModel.from_pretrained(base, folder)
        finally:
            assert not is_wrapped(base), "a refused adapter must leave the base model untouched"

    def load_adapter(folder):
        model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig())
        try:
            return model.load_adapter(str(folder), adapter_name="second")
        finally:
            assert list(model.peft_config) == ["default"], "a refused adapter must not be added"

    return {
        "CLIPAdapterConfig.from_pretrained": lambda folder: CLIPAdapterConfig.from_pretrained(folder),
        "PeftConfig.from_pretrained": lambda folder: PeftConfig.from_pretrained(str(folder)),
        "PeftModel.from_pretrained": peft_model,
        "load_adapter": load_adapter,
        "AutoPeftModel.from_pretrained": lambda folder: AutoPeftModel.from_pretrained(str(folder)),
    }


PATHS = [
    "CLIPAdapterConfig.from_pretrained",
    "PeftConfig.from_pretrained",
    "PeftModel.from_pretrained",
    "load_adapter",
    "AutoPeftModel.from_pretrained",
]
WEIGHT_PATHS = PATHS[2:]  # the config loaders read no weights besides the folder checks


# --- adapter_config.json ------------------------------------------------------------------------------


CONFIG_CASES = {
    "empty": ("", r"adapter_config\.json is empty: a save into it was interrupted"),
    "not JSON": ('{"ratio": 0.2,', r"adapter_config\.json is not valid JSON"),
    "a list": ("[1, 2]", r"adapter_config\.json must hold a JSON object .*got list"),
    "a string": ('"CLIP_ADAPTER"', r"adapter_config\.json must hold a JSON object .*got str"),
    "not UTF-8": (b"\xff\xfe{", r"adapter_config\.json is not valid JSON"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_unreadable_config(saved, tiny_clip_path, path, case):
    content, match = CONFIG_CASES[case]
    write_config(saved, content)
    with pytest.raises(ValueError, match=match):
        load_paths(tiny_clip_path)[path](saved)


FIELD_CASES = {
    "no peft_type": (dict(peft_type=...), r'has no "peft_type".*add "peft_type": "CLIP_ADAPTER"'),
    "lower-case peft_type": (dict(peft_type="clip_adapter"), r"peft_type='clip_adapter'.*did you mean 'CLIP_ADAPTER'"),
    "dashed peft_type": (dict(peft_type="CLIP-ADAPTER"), r"peft_type='CLIP-ADAPTER'.*did you mean 'CLIP_ADAPTER'"),
    "typo in peft_type": (dict(peft_type="CLIP_ADAPTR"), r"peft_type='CLIP_ADAPTR'.*did you mean 'CLIP_ADAPTER'"),
    "peft_type not a string": (dict(peft_type=3), r"peft_type=3, which is not a registered PEFT method"),
    "no ratio": (dict(ratio=...), r"adapter_config\.json has no 'ratio': without it the adapter would load"),
    "no reduction": (dict(reduction=...), r"has no 'reduction'"),
    "no targets": (dict(target_modules=None, adapt=None), r"has no 'target_modules / adapt'"),
    "unknown field": (dict(ratoi=0.6), r"has the unknown field 'ratoi' \(did you mean 'ratio'\?\).*newer version"),
    "inference_mode not a bool": (dict(inference_mode="yes"), r"inference_mode='yes' \(str\); it must be bool"),
    "base model not a string": (dict(base_model_name_or_path=5), r"base_model_name_or_path=5 \(int\); it must be str"),
    "ratio out of range": (dict(ratio=1.5), r"ratio must be in \[0, 1\]"),
    "reduction a string": (dict(reduction="4"), r"reduction must be a whole number"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", FIELD_CASES)
def test_config_with_a_bad_field(saved, tiny_clip_path, path, case):
    changes, match = FIELD_CASES[case]
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        load_paths(tiny_clip_path)[path](saved)


def test_missing_config(saved, tiny_clip_path):
    (foreign(saved) / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter has no adapter_config\.json; it holds \['README\.md', .*Pass the"):
        CLIPAdapterConfig.from_pretrained(saved)
    # peft looks for the file itself first, with its own ValueError.
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        load_paths(tiny_clip_path)["PeftModel.from_pretrained"](saved)


def test_config_of_another_method_in_our_loaders(saved, tiny_clip_path):
    edit_config(saved, peft_type="LORA")
    with pytest.raises(ValueError, match=r"peft_type='LORA'; a CLIP-Adapter config has peft_type='CLIP_ADAPTER'"):
        load_paths(tiny_clip_path)["load_adapter"](saved)


def test_other_methods_read_exactly_as_before(tmp_path):
    # The generic reader is checked, not changed: a valid config of another method loads as peft loads it.
    from peft import LoraConfig

    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(str(tmp_path)).r == 4
    assert LoraConfig.from_json_file(str(tmp_path / "adapter_config.json"))["r"] == 4


# --- adapter_model.safetensors ------------------------------------------------------------------------


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def weights_case(case: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    down, up = tensors[DOWN], tensors[UP]
    if case == "int8":
        return {DOWN: down.to(torch.int8), UP: up}
    if case == "NaN":
        return {DOWN: down.index_fill(0, torch.tensor([0]), float("nan")), UP: up}
    if case == "Inf":
        return {DOWN: down, UP: up.index_fill(0, torch.tensor([1]), float("inf"))}
    if case == "logit_scale":
        return {**tensors, "base_model.model.logit_scale": torch.tensor(100.0)}
    if case == "projection weight":
        return {**tensors, "base_model.model.visual_projection.weight": torch.zeros(32, 32)}
    if case == "token embedding":
        return {**tensors, "base_model.model.text_model.embeddings.token_embedding.weight": torch.zeros(64, 32)}
    if case == "adapter name in key":
        return {DOWN.replace(".weight", ".default.weight"): down, UP: up}
    if case == "no up":
        return {DOWN: down}
    if case == "rank 3":
        return {DOWN: down[None], UP: up}
    if case == "transposed":
        return {DOWN: up, UP: down}
    if case == "reduction 2":
        return {DOWN: torch.zeros(16, 32), UP: torch.zeros(32, 16)}
    if case == "no tensors":
        return {}
    raise AssertionError(case)


WEIGHT_CASES = {
    "int8": r"clip_adapter_down\.weight' is torch\.int8; adapter weights are floating point",
    "NaN": r"clip_adapter_down\.weight' holds 32 NaN or infinite values",
    "Inf": r"clip_adapter_up\.weight' holds 8 NaN or infinite values",
    "logit_scale": r"holds 'base_model\.model\.logit_scale', which is not a CLIP-Adapter weight.*overwrite",
    "projection weight": r"holds 'base_model\.model\.visual_projection\.weight', which is not a CLIP-Adapter weight",
    "token embedding": r"token_embedding\.weight', which is not a CLIP-Adapter weight",
    "adapter name in key": r"clip_adapter_down\.default\.weight', which is not a CLIP-Adapter weight",
    "no up": r"holds base_model\.model\.visual_projection\.clip_adapter_down but no .*clip_adapter_up",
    "rank 3": r"shapes \(1, 8, 32\) and \(32, 8\), which do not form a bottleneck",
    "transposed": r"shapes \(32, 8\) and \(8, 32\), which do not form a bottleneck",
    "reduction 2": r"hidden width 16 for d=32 \(reduction=2\), but its config says reduction=4 \(hidden width 8\)",
    "no tensors": r"holds no tensors, so there is no adapter to load",
}


@pytest.mark.parametrize("path", WEIGHT_PATHS)
@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights_are_refused_before_they_reach_the_model(saved, tiny_clip_path, path, case):
    write_weights(saved, weights_case(case, tensors_of(saved)))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*" + WEIGHT_CASES[case]):
        load_paths(tiny_clip_path)[path](saved)


def test_refused_base_keys_leave_the_base_weights_alone(saved, tiny_clip_path):
    # Straight through peft's set_peft_model_state_dict too, which no file check sees.
    from peft import set_peft_model_state_dict

    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)
    before = model.base_model.model.logit_scale.detach().clone()
    state = {**tensors_of(saved), "base_model.model.logit_scale": torch.tensor(100.0)}
    with pytest.raises(ValueError, match=r"'base_model\.model\.logit_scale', which is not a CLIP-Adapter weight"):
        set_peft_model_state_dict(model, state)
    assert torch.equal(model.base_model.model.logit_scale, before)


def test_weights_missing(saved, tiny_clip_path):
    (foreign(saved) / "adapter_model.safetensors").unlink()
    assert CLIPAdapterConfig.from_pretrained(saved).ratio == 0.6  # the config alone still reads
    with pytest.raises(ValueError, match=r"adapter has no adapter_model\.safetensors, so there are no adapter"):
        load_paths(tiny_clip_path)["load_adapter"](saved)
    # PeftModel.from_pretrained finds out only after injecting: the config alone is a valid folder.
    with pytest.raises(ValueError, match=r"adapter has no adapter_model\.safetensors, so there are no adapter"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved)


@pytest.mark.parametrize("path", WEIGHT_PATHS)
def test_pickled_weights_are_refused_unread(saved, tiny_clip_path, hostile_pickle, path):
    (foreign(saved) / "adapter_model.safetensors").unlink()
    marker = hostile_pickle(saved / "adapter_model.bin", DOWN)
    with pytest.raises(ValueError, match=r"adapter_model\.bin was not loaded: torch's weights-only unpickler refuses"):
        load_paths(tiny_clip_path)[path](saved)
    assert not marker.exists()


def test_a_pickle_renamed_to_safetensors_is_refused_unread(saved, tiny_clip_path, hostile_pickle):
    marker = hostile_pickle(foreign(saved) / "adapter_model.safetensors", DOWN)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is a PyTorch pickle, not a safetensors file"):
        load_paths(tiny_clip_path)["PeftModel.from_pretrained"](saved)
    assert not marker.exists()


def test_another_reduction_passed_at_load_time_is_named_as_such(saved, tiny_clip_path):
    match = r"hidden width 8 for d=32 \(reduction=4\), but its config says reduction=2"
    with pytest.raises(ValueError, match=match), pytest.warns(UserWarning, match="keeps its own config"):
        PeftModel.from_pretrained(
            CLIPModel.from_pretrained(tiny_clip_path), saved, config=CLIPAdapterConfig(reduction=2)
        )


def test_another_width_is_refused_before_the_model_is_touched(saved, tmp_path):
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    narrow = CLIPModel.from_pretrained(build_tiny_clip(tmp_path / "d24", projection_dim=24))
    with pytest.raises(ValueError, match=r"safetensors does not fit this model .*d=32 .* embedding width is d=24"):
        PeftModel.from_pretrained(narrow, saved)
    assert not is_wrapped(narrow)


def test_weights_of_the_other_branch(saved, tiny_clip_path):
    text = {key.replace("visual_projection", "text_projection"): value for key, value in tensors_of(saved).items()}
    write_weights(saved, text)
    for path in ("PeftModel.from_pretrained", "load_adapter"):
        with pytest.raises(
            ValueError, match=r"adapts \['visual_projection'\], but the file holds adapter weights for"
        ):
            load_paths(tiny_clip_path)[path](saved)


def test_a_load_that_fails_midway_removes_the_adapter_it_added(saved, tiny_clip_path, monkeypatch):
    import peft.peft_model

    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig())

    def failing(*args, **kwargs):
        raise ValueError("failed while setting the weights")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", failing)
    with pytest.raises(ValueError, match="failed while setting the weights"):
        model.load_adapter(str(saved), "second")
    assert list(model.peft_config) == ["default"]
    assert not any(".second." in name for name, _ in model.named_parameters())


def hub_repo(saved: Path, cache: Path, name: str = "me--x") -> str:
    snapshot = cache / f"models--{name}" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(saved, snapshot)
    (cache / f"models--{name}" / "refs").mkdir()
    (cache / f"models--{name}" / "refs" / "main").write_text("0" * 40)
    return name.replace("--", "/")


@pytest.mark.parametrize("case", ["NaN", "logit_scale", "reduction 2"])
def test_hub_downloads_are_checked_like_folders(saved, tiny_clip_path, tmp_path, case):
    write_weights(saved, weights_case(case, tensors_of(saved)))
    repo = hub_repo(saved, tmp_path / "cache")
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig())
    with pytest.raises(ValueError, match=r"snapshots/0+/adapter_model\.safetensors.*" + WEIGHT_CASES[case]):
        model.load_adapter(repo, "second", cache_dir=str(tmp_path / "cache"))
    assert list(model.peft_config) == ["default"]


def test_hub_repository_without_safetensors(saved, tiny_clip_path, tmp_path):
    (foreign(saved) / "adapter_model.safetensors").unlink()
    repo = hub_repo(saved, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"me/x has neither adapter_model\.safetensors nor adapter_model\.bin that"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), repo, cache_dir=str(tmp_path / "cache"))


# --- adapter names, wrapping twice, saving nothing ------------------------------------------------------


BAD_NAMES = ["/tmp/outside", "../outside", "a.b", "", "x/y", "-flag", "name with spaces"]


@pytest.mark.parametrize("name", BAD_NAMES)
# peft warns about a name inside the prefix ('' is in every string) before our check refuses it.
@pytest.mark.filterwarnings("ignore:Adapter name '' should not be contained in the prefix:UserWarning")
def test_adapter_names_must_be_plain(tiny_clip_path, saved, tmp_path, name):
    match = rf"adapter_name={name!r} is not a plain name"
    with pytest.raises(ValueError, match=match):
        get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(), adapter_name=name)
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig())
    with pytest.raises(ValueError, match=match):
        model.add_adapter(name, CLIPAdapterConfig())
    with pytest.raises(ValueError, match=match):
        model.load_adapter(str(saved), adapter_name=name)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), saved, adapter_name=name)
    assert list(model.peft_config) == ["default"]


def test_an_absolute_adapter_name_never_writes_outside(tiny_clip, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    outside = tmp_path / "outside"
    # A name smuggled past add_adapter (peft_config is a plain dict) is still refused by the save.
    model.peft_config[str(outside)] = model.peft_config["default"]
    with pytest.raises(ValueError, match="is not a plain name"):
        model.save_pretrained(tmp_path / "out")
    assert not outside.exists() and not (tmp_path / "out").exists()


# peft's own generic warnings come first; what matters is that our refusal follows and nothing changes.
@pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT for a second time:UserWarning")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute in the model:UserWarning")
def test_wrapping_a_peft_model_again_is_refused(tiny_clip):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if "clip_adapter_" in name}
    with pytest.raises(ValueError, match=r"already a PeftModel \(adapters \['default'\]\).*add_adapter"):
        get_peft_model(model, CLIPAdapterConfig())
    with pytest.raises(ValueError, match=r"CLIPModel already holds CLIP-Adapter layers \(adapters \['default'\]\)"):
        get_peft_model(model.get_base_model(), CLIPAdapterConfig(), adapter_name="other")
    for name, parameter in model.named_parameters():
        if name in weights:
            assert torch.equal(parameter, weights[name]), f"{name} was re-initialised"


def test_saving_a_model_without_adapters(tiny_clip, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.delete_adapter("default")
    with pytest.raises(ValueError, match=r"holds no adapter \(delete_adapter removed the last one\)"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saved_files_have_the_usual_permissions(tiny_clip, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.add_adapter("second", CLIPAdapterConfig(adapt="text"))
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {
        str(path.relative_to(tmp_path)): oct(path.stat().st_mode & 0o777) for path in (tmp_path / "out").rglob("*")
    }
    assert modes == {
        "out/README.md": "0o644",
        "out/adapter_config.json": "0o644",
        "out/adapter_manifest.json": "0o644",
        "out/adapter_model.safetensors": "0o644",
        "out/second": "0o755",
        "out/second/adapter_config.json": "0o644",
        "out/second/adapter_manifest.json": "0o644",
        "out/second/adapter_model.safetensors": "0o644",
    }


def test_loading_into_an_existing_adapter_says_which_config_it_keeps(saved, tiny_clip_path):
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(ratio=0.2))
    with pytest.warns(
        UserWarning, match=r"existing adapter 'default', which keeps its own config: ratio 0\.2 \(saved"
    ):
        model.load_adapter(str(saved), "default")
    assert model.peft_config["default"].ratio == 0.2  # peft's rule, unchanged: only the weights are loaded


def test_saving_below_a_file(tiny_clip, saved):
    with pytest.raises(ValueError, match=r"cannot be created: .*adapter_config\.json is a file, not a folder"):
        get_peft_model(tiny_clip, CLIPAdapterConfig()).save_pretrained(saved / "adapter_config.json" / "inside")
