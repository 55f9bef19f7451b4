"""The CLIP-LoRA baseline: its peft config's targets, training (only LoRA, seeded, learning) and its logits."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.nn import functional as F
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    GroupViTConfig,
    GroupViTModel,
)

from peft_clip_adapter.fewshot.baselines.lora import _TrainViews, lora_config_for, lora_logits, train_lora
from peft_clip_adapter.fewshot.data import (
    build_train_transform,
    class_names,
    load_image_classification_data,
    sample_few_shot,
)
from peft_clip_adapter.fewshot.training import one_thread_on_cpu
from peft_clip_adapter.testing.tiny_models import build_tiny_model

TEMPLATES = ["a photo of a {}.", "a {} shape."]

# Every encoder layer's q, k and v projection in both towers of the tiny CLIP and SigLIP (2 layers each); not
# SigLIP's attention-pooling head.
TINY_TARGETS = [
    "text_model.encoder.layers.0.self_attn.k_proj",
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.v_proj",
    "text_model.encoder.layers.1.self_attn.k_proj",
    "text_model.encoder.layers.1.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "vision_model.encoder.layers.0.self_attn.k_proj",
    "vision_model.encoder.layers.0.self_attn.q_proj",
    "vision_model.encoder.layers.0.self_attn.v_proj",
    "vision_model.encoder.layers.1.self_attn.k_proj",
    "vision_model.encoder.layers.1.self_attn.q_proj",
    "vision_model.encoder.layers.1.self_attn.v_proj",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the tiny models' matrices are too small for two to pay, and on a busy machine two are slower."""
    with one_thread_on_cpu(torch.device("cpu")):
        yield


@pytest.fixture(scope="module")
def tiny_paths(tiny_clip_path, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("lora-models")
    built = {family: build_tiny_model(folder / family, family=family) for family in ("siglip", "siglip2", "clap")}
    return {"clip": tiny_clip_path, **built}


@pytest.fixture(scope="module")
def shots(shapes_dir):
    """2 shots of each of the 4 shape classes, and the held-out images."""
    splits = load_image_classification_data(train_dir=shapes_dir, seed=0)
    return sample_few_shot(splits["train"], 2, seed=0), splits["validation"]


def _train(path, train, *, seed=0, iterations=2, **options):
    model = AutoModel.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return train_lora(
        model, processor, train, class_names(train), TEMPLATES, seed=seed, iterations=iterations, **options
    )


def _lora_weights(peft_model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in peft_model.state_dict().items() if "lora_" in name}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_config_targets_both_towers_attention_projections(tiny_paths, family):
    model = AutoModel.from_pretrained(tiny_paths[family])
    config = lora_config_for(model)
    assert sorted(config.target_modules) == TINY_TARGETS
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (2, 1, 0.25, "none")
    wrapped = get_peft_model(model, config)
    adapted = sorted(name for name, module in wrapped.get_base_model().named_modules() if hasattr(module, "lora_A"))
    assert adapted == TINY_TARGETS


def _groupvit() -> GroupViTModel:
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    vision = {**tower, "depths": [1, 1], "num_hidden_layers": 2, "num_group_tokens": [4, 0]}
    vision["num_output_groups"] = [4, 4]
    return GroupViTModel(GroupViTConfig(text_config={**tower, "num_hidden_layers": 1}, vision_config=vision))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda paths: AutoModel.from_pretrained(paths["clap"]), "ClapModel has no attention projections for LoRA in "
         "either tower"),
        (lambda paths: CLIPVisionModel(CLIPConfig.from_pretrained(paths["clip"]).vision_config), "CLIPVisionModel has "
         "no attention projections for LoRA in either tower"),
        (lambda paths: _groupvit(), "GroupViTModel has no attention projections for LoRA in its vision tower"),
    ],
)  # fmt: skip
def test_a_model_without_the_projections_is_refused(tiny_paths, build, message):
    with pytest.raises(ValueError, match=message + r": CLIP-LoRA adapts the q_proj, k_proj and v_proj"):
        lora_config_for(build(tiny_paths))


def test_a_rank_below_one_is_refused(tiny_clip):
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1"):
        lora_config_for(tiny_clip, rank=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iterations": 0}, r"iterations=0 must be an integer >= 1"),
        ({"batch_size": 0}, r"batch_size=0 must be an integer >= 1"),
        ({"learning_rate": 0.0}, r"learning_rate=0.0 must be > 0"),
        ({"names": ["red circle", "green square"]}, r"has label 3 but class_names holds 2 names \(labels 0 to 1\)"),
        ({"rows": 0}, r"train_dataset has no rows"),
    ],
)
def test_bad_training_arguments_are_refused_before_wrapping(tiny_clip, tiny_processor, shots, options, message):
    train, _ = shots
    names = options.pop("names", class_names(train))
    train = train.select(range(options.pop("rows", len(train))))
    arguments = {"seed": 0, "iterations": 1, **options}
    with pytest.raises(ValueError, match=message):
        train_lora(tiny_clip, tiny_processor, train, names, TEMPLATES, **arguments)
    assert not any("lora_" in name for name, _ in tiny_clip.named_parameters())


def test_training_changes_only_lora_weights_and_is_seeded(tiny_clip_path, shots):
    train, _ = shots
    base = CLIPModel.from_pretrained(tiny_clip_path).state_dict()
    first, again, other = (_train(tiny_clip_path, train, seed=seed) for seed in (0, 0, 1))
    trained = first.get_base_model().state_dict()
    for name, value in trained.items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    weights = _lora_weights(first)
    assert any(name.endswith("lora_B.default.weight") and value.abs().sum() > 0 for name, value in weights.items())
    assert all(torch.equal(value, _lora_weights(again)[name]) for name, value in weights.items())
    assert not all(torch.equal(value, _lora_weights(other)[name]) for name, value in weights.items())
    assert not first.training


def _cross_entropy(peft_model, processor, dataset) -> float:
    logits = lora_logits(peft_model, processor, dataset, class_names(dataset), TEMPLATES)
    return F.cross_entropy(logits, torch.tensor(dataset["label"])).item()


def test_the_loss_falls_on_a_tiny_task(tiny_clip_path, tiny_processor, shots):
    train, _ = shots
    model = CLIPModel.from_pretrained(tiny_clip_path)
    fresh = get_peft_model(model, lora_config_for(model))
    trained = _train(tiny_clip_path, train, iterations=24, learning_rate=2e-2)  # 1.45 -> 0.47 (seeded)
    assert _cross_entropy(trained, tiny_processor, train) < 0.6 * _cross_entropy(fresh, tiny_processor, train)


def _zero_shot_by_hand(model, processor, images, names) -> torch.Tensor:
    """logit_scale * normalised image embeddings @ normalised mean of the normalised template embeddings."""
    prompts = [template.format(name) for name in names for template in TEMPLATES]
    with torch.no_grad():
        text = model.get_text_features(**processor.tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)  # [N, D]
    prototypes = F.normalize(F.normalize(text, dim=-1).reshape(len(names), len(TEMPLATES), -1).mean(dim=1), dim=-1)
    return model.logit_scale.exp() * image @ prototypes.T  # [N, C]


def test_logits_without_lora_are_the_zero_shot_logits(tiny_clip_path, tiny_processor, shots):
    train, held_out = shots
    names = class_names(train)
    base = CLIPModel.from_pretrained(tiny_clip_path).eval()
    expected = _zero_shot_by_hand(base, tiny_processor, [image.convert("RGB") for image in held_out["image"]], names)
    model = CLIPModel.from_pretrained(tiny_clip_path)
    fresh = get_peft_model(model, lora_config_for(model))  # LoRA B = 0: the base model
    logits = lora_logits(fresh, tiny_processor, held_out, names, TEMPLATES)
    assert logits.shape == (len(held_out), len(names)) and logits.dtype == torch.float32
    close = {"atol": 1e-4, "rtol": 1e-4}  # the eval transform equals the processor to float rounding
    torch.testing.assert_close(logits, expected, **close)

    trained = _train(tiny_clip_path, train, iterations=3, learning_rate=2e-2)
    assert not torch.allclose(lora_logits(trained, tiny_processor, held_out, names, TEMPLATES), expected, atol=1e-3)
    with trained.disable_adapter():
        torch.testing.assert_close(lora_logits(trained, tiny_processor, held_out, names, TEMPLATES), expected, **close)


def test_training_views_are_the_train_transform_s(tiny_processor, shots):
    train, _ = shots
    transform = build_train_transform(tiny_processor, seed=3)
    views = _TrainViews(train, "image", transform)
    rows = [5, 0, 2]
    for view in (0, 1, 0):  # the second pass over view 0 reads the decoded images kept in memory
        expected = torch.stack([transform(train[row]["image"], index=row, view=view) for row in rows])
        assert torch.equal(views(rows, view)["pixel_values"], expected)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_siglip_families_train_and_classify_unseen_names(tiny_paths, shots, family):
    train, held_out = shots
    trained = _train(tiny_paths[family], train, iterations=2, batch_size=4)
    processor = AutoProcessor.from_pretrained(tiny_paths[family])
    novel = ["red square", "blue circle", "green cross"]  # names never trained on: base-to-novel
    logits = lora_logits(trained, processor, held_out.select(range(5)), novel, TEMPLATES, batch_size=2)
    assert logits.shape == (5, 3) and torch.isfinite(logits).all()
