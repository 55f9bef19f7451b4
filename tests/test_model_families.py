"""CLIP-Adapter on every contrastive dual encoder of transformers 5.24, each checked exactly with a tiny config.

For every family: the adapted ``get_image_features`` / ``get_text_features`` / ``get_audio_features`` equal
the paper's formula applied, with the SAVED weights, to the embedding of the model with the adapter
disabled; ``forward``'s logits equal the family's own logit formula on those adapted embeddings; save ->
load is bit-exact; and the single-tower classes load an adapter trained on the full model.

Families (the module whose output is each tower's final pooled embedding, written out here independently
of ``peft_clip_adapter.families`` so that the table is checked, not trusted):

- CLIP and the families built like it: ``visual_projection`` / ``text_projection`` Linears (CLIP,
  MetaCLIP 2, AIMv2, Chinese-CLIP, AltCLIP, CLIPSeg, OWL-ViT, OWLv2, BLIP, VisionTextDualEncoder).
- SigLIP and SigLIP 2 (NaFlex inputs from its own processor): ``vision_model.head`` (attention pooling)
  and ``text_model.head`` (a Linear on the last token); logits have a bias.
- ALIGN: ``vision_model.pooler`` (an AvgPool2d over the last feature map, adapted on its channels) and
  ``text_projection``; logits are divided by a temperature.
- GroupViT: ``visual_projection`` / ``text_projection`` are MLP blocks (Linear, BatchNorm1d, ReLU, Linear).
- CLAP: ``audio_projection`` / ``text_projection`` MLP blocks; ``get_*_features`` L2-normalise after them.

Not dual encoders in this sense (so not in the table): X-CLIP (its ``visual_projection`` maps each frame
before a multi-frame transformer), BLIP-2, FLAVA, GIT, Grounding DINO, OmDet-Turbo and the like, whose
projections are per token or feed a decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.nn import functional as F

from peft_clip_adapter import CLIPAdapterConfig, adapter_layers
from peft_clip_adapter.families import POOLED_EMBEDDINGS
from peft_clip_adapter.testing.tiny_models import CLAP_SAMPLING_RATE, TINY_CLAP_AUDIO, TINY_CLAP_FEATURES

D = 16  # pooled-embedding width of every tiny model
RATIO, REDUCTION = 0.3, 2  # a hidden width of 8: with 4, CLAP's random adapter happens to be all ReLU-dead here
TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**TOWER, "image_size": 16, "patch_size": 8}
TEXT = {**TOWER, "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 2, "bos_token_id": 1}
BERT = {**TOWER, "vocab_size": 64, "max_position_embeddings": 32, "type_vocab_size": 2, "pad_token_id": 0}
SIGLIP_TEXT = {**TOWER, "vocab_size": 64, "max_position_embeddings": 16, "projection_size": D}
ALIGN_VISION = {  # a two-block EfficientNet: 16 px -> 8 -> 4 -> 2, 16 channels, pooled to 1 x 1
    "image_size": 16,
    "width_coefficient": 0.5,
    "depth_coefficient": 1.0,
    "hidden_dim": 64,
    "kernel_sizes": [3, 3],
    "in_channels": [32, 16],
    "out_channels": [16, 32],
    "strides": [2, 2],
    "num_block_repeats": [1, 1],
    "expand_ratios": [1, 2],
}
GROUPVIT_VISION = {
    **VISION,
    "depths": [1, 1],
    "num_group_tokens": [4, 0],
    "num_output_groups": [4, 4],
    "num_hidden_layers": 2,
}
CLAP_AUDIO = {**TINY_CLAP_AUDIO, "projection_dim": D}

GENERATOR = torch.Generator().manual_seed(0)
PIXELS = torch.randn(2, 3, 16, 16, generator=GENERATOR)
INPUT_IDS = torch.tensor([[1, 5, 7, 9, 2], [1, 6, 8, 3, 2]])


def naflex_inputs() -> dict[str, torch.Tensor]:
    """SigLIP 2's variable-resolution inputs for two images of different shapes, from its own processor."""
    from PIL import Image

    processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)
    images = [Image.fromarray(np.uint8(np.random.default_rng(i).integers(0, 255, (h, w, 3)))) for i, (h, w) in
              enumerate([(16, 24), (24, 10)])]  # fmt: skip
    return dict(processor(images, return_tensors="pt"))  # pixel_values [2, 16, 48], mask [2, 16], spatial_shapes


def clap_inputs() -> dict[str, torch.Tensor]:
    """CLAP's log-mel input features of a tone and of noise, from its own feature extractor (numpy only)."""
    extractor = transformers.ClapFeatureExtractor(**TINY_CLAP_FEATURES)
    time = np.arange(6000) / CLAP_SAMPLING_RATE
    waves = [np.sin(2 * np.pi * 440 * time), np.random.default_rng(0).standard_normal(CLAP_SAMPLING_RATE)]
    features = extractor(
        [wave.astype(np.float32) for wave in waves], sampling_rate=CLAP_SAMPLING_RATE, return_tensors="pt"
    )
    return {"input_features": features["input_features"]}  # [2, 1, 63, 16]


@dataclass(frozen=True)
class Family:
    model_class: str
    make_config: Callable[[], transformers.PretrainedConfig]
    paths: dict[str, str]  # branch -> the module whose output is that tower's pooled embedding
    inputs: dict[str, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)
    single_towers: dict[str, str] = field(default_factory=dict)  # branch -> class loading this model's folder

    def tower_inputs(self, branch: str) -> dict[str, torch.Tensor]:
        defaults = {"vision": lambda: {"pixel_values": PIXELS}, "text": lambda: {"input_ids": INPUT_IDS}}
        return {**defaults, **self.inputs}[branch]()


CLIP_PATHS = {"vision": "visual_projection", "text": "text_projection"}
SIGLIP_PATHS = {"vision": "vision_model.head", "text": "text_model.head"}


def clip_like(model_class: str, make_config, single_towers=None) -> Family:
    return Family(model_class, make_config, CLIP_PATHS, single_towers=single_towers or {})


FAMILIES = [
    clip_like(
        "CLIPModel",
        lambda: transformers.CLIPConfig(
            text_config={**TEXT, "projection_dim": D}, vision_config={**VISION, "projection_dim": D}, projection_dim=D
        ),
        {"vision": "CLIPVisionModelWithProjection", "text": "CLIPTextModelWithProjection"},
    ),
    clip_like(
        "MetaClip2Model",
        lambda: transformers.MetaClip2Config(
            text_config={**TEXT, "projection_dim": D}, vision_config={**VISION, "projection_dim": D}, projection_dim=D
        ),
        {"vision": "MetaClip2VisionModelWithProjection", "text": "MetaClip2TextModelWithProjection"},
    ),
    clip_like(
        "Aimv2Model",
        lambda: transformers.Aimv2Config(
            text_config={**TEXT, "num_key_value_heads": 2}, vision_config=VISION, projection_dim=D
        ),
    ),
    clip_like(
        "ChineseCLIPModel",
        lambda: transformers.ChineseCLIPConfig(text_config=BERT, vision_config=VISION, projection_dim=D),
    ),
    clip_like(
        "AltCLIPModel",
        lambda: transformers.AltCLIPConfig(
            text_config={**BERT, "project_dim": 16, "max_position_embeddings": 34},
            vision_config=VISION,
            projection_dim=D,
        ),
    ),
    clip_like(
        "CLIPSegModel", lambda: transformers.CLIPSegConfig(text_config=TEXT, vision_config=VISION, projection_dim=D)
    ),
    clip_like(
        "OwlViTModel", lambda: transformers.OwlViTConfig(text_config=TEXT, vision_config=VISION, projection_dim=D)
    ),
    clip_like(
        "Owlv2Model", lambda: transformers.Owlv2Config(text_config=TEXT, vision_config=VISION, projection_dim=D)
    ),
    clip_like(
        "BlipModel",
        lambda: transformers.BlipConfig(
            text_config={**BERT, "encoder_hidden_size": 16}, vision_config=VISION, projection_dim=D
        ),
    ),
    clip_like(
        "VisionTextDualEncoderModel",
        lambda: transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            transformers.ViTConfig(**VISION), transformers.BertConfig(**BERT), projection_dim=D
        ),
    ),
    Family(
        "SiglipModel",
        lambda: transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=VISION),
        SIGLIP_PATHS,
        single_towers={"vision": "SiglipVisionModel", "text": "SiglipTextModel"},
    ),
    Family(
        "Siglip2Model",
        lambda: transformers.Siglip2Config(
            text_config=SIGLIP_TEXT, vision_config={**TOWER, "patch_size": 4, "num_patches": 16}
        ),
        SIGLIP_PATHS,
        inputs={"vision": naflex_inputs},
        single_towers={"vision": "Siglip2VisionModel", "text": "Siglip2TextModel"},
    ),
    Family(
        "AlignModel",
        lambda: transformers.AlignConfig(text_config=BERT, vision_config=ALIGN_VISION, projection_dim=D),
        {"vision": "vision_model.pooler", "text": "text_projection"},
        single_towers={"vision": "AlignVisionModel"},
    ),
    Family(
        "GroupViTModel",
        lambda: transformers.GroupViTConfig(
            text_config=TEXT, vision_config=GROUPVIT_VISION, projection_dim=D, projection_intermediate_dim=32
        ),
        CLIP_PATHS,
    ),
    Family(
        "ClapModel",
        lambda: transformers.ClapConfig(
            text_config={**BERT, "projection_dim": D, "pad_token_id": 1, "max_position_embeddings": 40},
            audio_config=CLAP_AUDIO,
            projection_dim=D,
        ),
        {"audio": "audio_projection", "text": "text_projection"},
        inputs={"audio": clap_inputs},
        single_towers={"audio": "ClapAudioModelWithProjection", "text": "ClapTextModelWithProjection"},
    ),
]
GETTERS = {"vision": "get_image_features", "text": "get_text_features", "audio": "get_audio_features"}
SINGLE_FIELDS = {"vision": "image_embeds", "text": "text_embeds", "audio": "audio_embeds"}


def build(family: Family) -> torch.nn.Module:
    """The family's tiny model with the same random weights on every call."""
    torch.manual_seed(0)
    return getattr(transformers, family.model_class)(family.make_config()).eval()


@torch.no_grad()
def embedding(model: torch.nn.Module, family: Family, branch: str) -> torch.Tensor:
    """What the model's own method returns for ``branch``: ``[2, D]``."""
    return getattr(model, GETTERS[branch])(**family.tower_inputs(branch)).pooler_output


def hand_adapter(f: torch.Tensor, weights: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    """The paper's formula, written out with the saved weight matrices."""
    w1 = weights[f"base_model.model.{path}.clip_adapter_down.weight"]  # [d/r, d]
    w2 = weights[f"base_model.model.{path}.clip_adapter_up.weight"]  # [d, d/r]
    return RATIO * torch.clamp(torch.clamp(f @ w1.T, min=0) @ w2.T, min=0) + (1 - RATIO) * f  # [n, d]


def expected_logits(model: torch.nn.Module, query: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Each family's own logit formula, ``[queries, texts]``."""
    cosine = F.normalize(query, dim=-1) @ F.normalize(text, dim=-1).T
    name = type(model).__name__
    if name == "AlignModel":
        return cosine / model.temperature
    if name == "ClapModel":
        return cosine * model.logit_scale_a.exp()
    if name == "Aimv2Model":
        return cosine * model.logit_scale.clamp(0.0, model.max_log_logit_scale).exp()
    if name.startswith("Siglip"):
        return cosine * model.logit_scale.exp() + model.logit_bias
    return cosine * model.logit_scale.exp()


@pytest.fixture(params=FAMILIES, ids=lambda family: family.model_class)
def family(request) -> Family:
    return request.param


def test_adapted_embeddings_and_logits_equal_the_formula_on_the_saved_weights(family, tmp_path):
    base = build(family)
    model = get_peft_model(build(family), CLIPAdapterConfig(adapt="both", ratio=RATIO, reduction=REDUCTION))
    assert {branch: layer.width for branch, layer in adapter_layers(model).items()} == dict.fromkeys(family.paths, D)
    assert model.get_nb_trainable_parameters()[0] == len(family.paths) * 2 * D * (D // REDUCTION)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(weights) == sorted(
        f"base_model.model.{path}.clip_adapter_{part}.weight"
        for path in family.paths.values()
        for part in ("down", "up")
    )

    adapted = {}
    for branch, path in family.paths.items():
        with model.disable_adapter():
            frozen = embedding(model, family, branch)  # [2, D], the disabled-adapter embedding
        # The plain model agrees to float precision (frozen weights let torch take other kernels, e.g.
        # nn.MultiheadAttention's fast path in SigLIP's pooling head).
        torch.testing.assert_close(frozen, embedding(base, family, branch), rtol=1e-5, atol=1e-6)
        expected = hand_adapter(frozen, weights, path)
        if family.model_class == "ClapModel":  # its get_*_features normalise after the projection
            expected = F.normalize(expected, dim=-1)
        adapted[branch] = embedding(model, family, branch)
        torch.testing.assert_close(adapted[branch], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(adapted[branch], frozen, rtol=1e-3, atol=0)

    query = "audio" if "audio" in family.paths else "vision"
    inputs = {**family.tower_inputs(query), **family.tower_inputs("text")}
    with torch.no_grad():
        output = model(**inputs)
    logits = output.logits_per_audio if query == "audio" else output.logits_per_image  # [2, 2]
    torch.testing.assert_close(logits, expected_logits(base, adapted[query], adapted["text"]), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_bit_identical(family, tmp_path):
    model = get_peft_model(build(family), CLIPAdapterConfig(adapt="both", ratio=0.5, reduction=REDUCTION))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(family), tmp_path)
    for branch in family.paths:
        assert torch.equal(embedding(reloaded, family, branch), embedding(model, family, branch))


SINGLE_TOWERS = [(family, branch) for family in FAMILIES for branch in family.single_towers]


@pytest.mark.parametrize(
    ("family", "branch"), SINGLE_TOWERS, ids=[family.single_towers[branch] for family, branch in SINGLE_TOWERS]
)
@pytest.mark.parametrize("adapt", ["branch", "both"])
def test_single_tower_loads_the_adapter_trained_on_the_full_model(family, branch, adapt, tmp_path):
    base = build(family)
    base.save_pretrained(tmp_path / "model")
    config = CLIPAdapterConfig(adapt=branch if adapt == "branch" else "both", ratio=0.4, reduction=REDUCTION)
    full = get_peft_model(base, config)
    full.save_pretrained(tmp_path / "adapter")
    single_class = getattr(transformers, family.single_towers[branch])
    single = PeftModel.from_pretrained(single_class.from_pretrained(tmp_path / "model").eval(), tmp_path / "adapter")
    assert list(adapter_layers(single)) == [branch]
    normalise = F.normalize if family.model_class == "ClapModel" else lambda f, dim: f  # as CLAP's get_*_features
    expected = embedding(full, family, branch)
    torch.testing.assert_close(
        normalise(single_embedding(single, family, branch), dim=-1), expected, rtol=1e-6, atol=1e-7
    )
    with single.disable_adapter():
        assert not torch.allclose(
            normalise(single_embedding(single, family, branch), dim=-1), expected, rtol=1e-3, atol=0
        )


@torch.no_grad()
def single_embedding(model: torch.nn.Module, family: Family, branch: str) -> torch.Tensor:
    output = model(**family.tower_inputs(branch))
    value = getattr(output, SINGLE_FIELDS[branch], None)
    return output.pooler_output if value is None else value  # SigLIP's and ALIGN's towers have no projection field


def test_every_class_in_the_table_is_checked_here():
    checked = {family.model_class for family in FAMILIES}
    checked |= {name for family in FAMILIES for name in family.single_towers.values()}
    assert checked == set(POOLED_EMBEDDINGS)
    for family in FAMILIES:
        table = POOLED_EMBEDDINGS[family.model_class]
        assert {branch: spec.path for branch, spec in table.items()} == family.paths


def test_groupvit_segmentation_groups_see_the_adapter_too():
    # GroupViT also projects its per-group embeddings through visual_projection (output_segmentation=True):
    # they are pooled group embeddings compared with the text, so the adapter applies to them alike.
    family = next(family for family in FAMILIES if family.model_class == "GroupViTModel")
    model = get_peft_model(build(family), CLIPAdapterConfig(ratio=RATIO))
    with torch.no_grad():
        output = model(input_ids=INPUT_IDS, pixel_values=PIXELS, output_segmentation=True)
    assert output.segmentation_logits.shape[:2] == (2, 2) and torch.isfinite(output.segmentation_logits).all()
    assert math.isfinite(output.logits_per_image.sum().item())


def supported_models_table() -> str:
    """The Markdown table of ``POOLED_EMBEDDINGS`` that docs/supported-models.md shows."""
    branches = ("vision", "text", "audio")
    rows = ["| model class | vision | text | audio |", "|---|---|---|---|"]
    for name, towers in POOLED_EMBEDDINGS.items():
        cells = [f"`{towers[b].path}` ({towers[b].kind})" if b in towers else "" for b in branches]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_the_supported_models_page_shows_the_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "supported-models.md").read_text(encoding="utf-8")
    table = supported_models_table()
    assert table in page, "Replace the table in docs/supported-models.md with:\n" + table
