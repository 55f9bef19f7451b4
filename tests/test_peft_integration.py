"""The seam to peft: importing the package changes nothing another method (LoRA) can observe, and peft's own
contract holds for CLIP-Adapter (pickled weights, in/out features, unknown config fields)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import CLIPModel

from peft_clip_adapter import CLIPAdapterConfig, CLIPAdapterLayer, adapter_layers

# Runs in a fresh interpreter, with or without `import peft_clip_adapter` first, and prints what a LoRA user sees.
LORA_SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("always")
if sys.argv[1] == "with":
    import peft_clip_adapter
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import CLIPModel

folder, clip = sys.argv[2], sys.argv[3]
report = {}

def outcome(name, call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
            result = ["ok", repr(value)[:300]]
        except Exception as error:
            result = [type(error).__name__, str(error).replace(folder, "<folder>")]
    report[name] = [result, sorted(f"{w.category.__name__}: {w.message}" for w in caught)]

model = get_peft_model(CLIPModel.from_pretrained(clip), LoraConfig(r=2, target_modules=["q_proj"]))
outcome("save", lambda: model.save_pretrained(folder + "/lora"))
outcome("save pickle", lambda: model.save_pretrained(folder + "/pickled", safe_serialization=False))
outcome("files", lambda: sorted(os.listdir(folder + "/lora")))
outcome("config", lambda: PeftConfig.from_pretrained(folder + "/lora").to_dict())
outcome("peft type", lambda: PeftConfig._get_peft_type(folder + "/lora"))
for name in ("lora", "pickled"):
    load = lambda: PeftModel.from_pretrained(CLIPModel.from_pretrained(clip), folder + "/" + name)
    outcome(f"load {name}", lambda: sorted(load().peft_config))
config = json.load(open(folder + "/lora/adapter_config.json"))
broken = {
    "empty": "",
    "invalid JSON": '{"r": 2,',
    "a list": "[1, 2]",
    "no peft_type": json.dumps({k: v for k, v in config.items() if k != "peft_type"}),
    "unknown peft_type": json.dumps({**config, "peft_type": "LORAA"}),
    "unknown field": json.dumps({**config, "foobar": 1}),
    "runtime_config": json.dumps({**config, "runtime_config": {}}),
}
for case, text in broken.items():
    os.makedirs(f"{folder}/{case}", exist_ok=True)
    open(f"{folder}/{case}/adapter_config.json", "w").write(text)
    outcome(f"{case}: PeftConfig", lambda: PeftConfig.from_pretrained(f"{folder}/{case}").to_dict())
    outcome(f"{case}: LoraConfig", lambda: LoraConfig.from_pretrained(f"{folder}/{case}").to_dict())
    outcome(f"{case}: peft type", lambda: PeftConfig._get_peft_type(f"{folder}/{case}"))
print(json.dumps(report))
"""


@pytest.mark.slow  # two fresh interpreters import torch, transformers and peft
def test_importing_the_package_changes_nothing_for_lora(tiny_clip_path, tmp_path):
    reports = {}
    for mode in ("without", "with"):
        folder = tmp_path / mode
        folder.mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-c", LORA_SCRIPT, mode, str(folder), tiny_clip_path],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    assert reports["with"] == reports["without"]
    # The comparison covers what it should: LoRA saved, loaded, and broken configs failed as peft fails them.
    assert reports["without"]["load lora"][0][0] == "ok" and reports["without"]["load pickled"][0][0] == "ok"
    assert reports["without"]["invalid JSON: PeftConfig"][0][0] == "JSONDecodeError"
    assert reports["without"]["no peft_type: peft type"][0][0] == "KeyError"
    assert any("foobar" in warning for warning in reports["without"]["unknown field: LoraConfig"][1])


def test_a_config_with_an_unknown_field_warns_and_loads(tmp_path):
    # peft's test_from_pretrained_forward_compatible: a field a newer release added is dropped with a warning.
    CLIPAdapterConfig(ratio=0.6).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "foobar": "baz", "spam": 123}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = CLIPAdapterConfig.from_pretrained(tmp_path)
    assert config.ratio == 0.6 and not hasattr(config, "foobar")
    assert len(caught) == 1 and "foobar" in str(caught[0].message) and "spam" in str(caught[0].message)
    with pytest.warns(UserWarning, match="Unexpected keyword arguments"):
        assert PeftConfig.from_pretrained(str(tmp_path)).ratio == 0.6


@pytest.mark.parametrize(("field", "known"), [("ration", "ratio"), ("redution", "reduction"), ("adpat", "adapt")])
def test_a_near_miss_of_a_known_field_is_refused_with_a_did_you_mean(tmp_path, field, known):
    CLIPAdapterConfig(ratio=0.6).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: 1}))
    match = rf"unknown field '{field}' \(did you mean '{known}'\?\): a misspelt field is ignored"
    for load in (CLIPAdapterConfig.from_pretrained, lambda folder: PeftConfig.from_pretrained(str(folder))):
        with pytest.raises(ValueError, match=match):
            load(tmp_path)


def test_the_layer_exposes_in_and_out_features(tiny_clip):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both"))
    for layer in adapter_layers(model).values():
        assert layer.in_features == layer.out_features == layer.width == 32


def test_pickled_weights_saved_by_peft_load_through_the_weights_only_unpickler(tiny_clip_path, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(ratio=0.6))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert loaded.peft_config["default"].ratio == 0.6


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"base_model.model.logit_scale": torch.zeros(())}, r"'base_model\.model\.logit_scale', which is not a CLIP"),
        ("NaN", r"holds 1 NaN or infinite values"),
        ([1, 2], r"holds a list, not a state dict of tensors"),
    ],
)
def test_pickled_weights_get_the_same_tensor_checks(tiny_clip_path, tmp_path, tensors, match):
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig())
    model.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "adapter_manifest.json").unlink()  # a folder from another tool: the weights checks alone
    if tensors == "NaN":
        tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
        next(iter(tensors.values()))[0, 0] = float("nan")
    torch.save(tensors, tmp_path / "adapter_model.bin")
    base = CLIPModel.from_pretrained(tiny_clip_path)
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*" + match):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(module, CLIPAdapterLayer) for module in base.modules())


def test_a_damaged_pickle_is_named(tiny_clip_path, tmp_path):
    get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig()).save_pretrained(
        tmp_path, safe_serialization=False
    )
    (tmp_path / "adapter_manifest.json").unlink()
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.bin cannot be read as PyTorch weights"):
        CLIPAdapterConfig.from_pretrained(tmp_path)


def test_extra_files_join_the_checked_set(tiny_clip, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.save_pretrained(tmp_path, extra_files={"notes.txt": "mine", "blob.bin": b"\x00\x01"})
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(json.loads((tmp_path / "adapter_manifest.json").read_text())["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "blob.bin",
        "notes.txt",
    ]
    (tmp_path / "notes.txt").write_text("changed")
    with pytest.raises(ValueError, match=r"notes\.txt is not the file adapter_manifest\.json records"):
        CLIPAdapterConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("extra_files", "match"),
    [
        ({"adapter_config.json": "{}"}, r"extra_files name 'adapter_config\.json' must be a plain file name"),
        ({"../outside.txt": "x"}, r"extra_files name '\.\./outside\.txt' must be a plain file name"),
        ({".hidden": "x"}, r"extra_files name '\.hidden' must be a plain file name"),
        ({"numbers.json": [1, 2]}, r"extra_files\['numbers\.json'\] must be str or bytes, got list"),
    ],
)
def test_bad_extra_files_are_refused_before_anything_is_written(tiny_clip, tmp_path, extra_files, match):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "out", extra_files=extra_files)
    assert not (tmp_path / "out").exists()


def test_card_facts_must_be_card_facts(tiny_clip, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    with pytest.raises(ValueError, match=r"card_facts must be a peft_clip_adapter\.model_card\.CardFacts, got"):
        model.save_pretrained(tmp_path, card_facts={"license": "mit"})


def test_the_peft_model_carries_no_trainer_state(tiny_clip):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    for name in ("class_prompts", "training_results", "license"):
        assert not hasattr(model, name)
    config = CLIPAdapterConfig()
    assert not [name for name in vars(config) if name.startswith("_saved")]


@pytest.mark.slow  # a fresh interpreter
def test_loading_an_adapter_imports_neither_datasets_nor_the_toolkit(tiny_clip_path, tmp_path):
    get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig()).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        import peft_clip_adapter
        from peft import PeftModel
        from transformers import CLIPModel
        PeftModel.from_pretrained(CLIPModel.from_pretrained({tiny_clip_path!r}), {str(tmp_path)!r})
        loaded = sorted(name for name in sys.modules if name == "datasets" or name.startswith("peft_clip_adapter."))
        print(loaded)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = eval(result.stdout.strip().splitlines()[-1])
    assert "datasets" not in modules and not [name for name in modules if ".fewshot" in name or ".testing" in name]


def test_our_peft_model_class_is_only_given_to_clip_adapter_models(tiny_clip):
    from peft import LoraConfig

    lora = get_peft_model(tiny_clip, LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(lora) is PeftModel


def test_a_folder_is_clip_adapters_by_its_weights_when_its_config_cannot_say(tiny_clip, tmp_path):
    from peft_clip_adapter import peft_integration

    get_peft_model(tiny_clip, CLIPAdapterConfig()).save_pretrained(tmp_path)
    (tmp_path / "adapter_manifest.json").unlink()
    config = Path(tmp_path / "adapter_config.json")
    config.write_text("{")
    assert peft_integration._is_clip_adapter_config(str(config))
    (tmp_path / "adapter_model.safetensors").unlink()
    assert not peft_integration._is_clip_adapter_config(str(config))
