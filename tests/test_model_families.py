"""CLIP-Adapter on every transformers model family whose pooled embeddings come out of projection linears.

Found by grepping ``transformers/models/*/modeling_*.py`` (transformers 5.24) for modules named
``visual_projection`` / ``text_projection``.

Qualify (the pooled image / text embedding is the output of an ``nn.Linear`` named ``visual_projection``
/ ``text_projection``, returned by ``get_image_features`` / ``get_text_features`` and used by
``forward``), each tested below with a tiny random config:

- CLIP: ``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``
- MetaCLIP 2: ``MetaClip2Model``, ``MetaClip2VisionModelWithProjection``, ``MetaClip2TextModelWithProjection``
- AIMv2 (``Aimv2Model``), Chinese-CLIP (``ChineseCLIPModel``), AltCLIP (``AltCLIPModel``),
  CLIPSeg (``CLIPSegModel``), OWL-ViT (``OwlViTModel``), OWLv2 (``Owlv2Model``), BLIP (``BlipModel``,
  its image-text contrastive embeddings), ``VisionTextDualEncoderModel``.

Do not qualify:

- ALIGN: the image embedding is the vision tower's pooled output, with no projection; only the text side
  has a ``text_projection`` (``adapt="vision"`` fails and names it, ``adapt="both"`` adapts text only).
- GroupViT: both projections are ``nn.Sequential`` MLPs, not linears (refused with a clear error).
- X-CLIP: ``visual_projection`` maps each frame; its output then goes through the multi-frame
  integration transformer and the text side through a video-conditioned prompt generator, so the
  projection output is not the final embedding and the paper's adapter would act mid-network.
- BLIP-2 (``vision_projection`` on query tokens), FLAVA (``image_projection``), CLAP (audio; MLP
  projections), GIT and VisualBERT (projections feed a decoder / the text embeddings), Grounding DINO,
  MM Grounding DINO, SAM 3, SAM 3 LiteText (per-token text projections into a detector), OmDet-Turbo
  (``text_projection`` is a parameter), Qwen3-Omni-MoE (talker MLP): none is a pooled contrastive embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from peft_clip_adapter import CLIPAdapterConfig, adapter_layers

D = 16  # projection width of every tiny model; reduction 4 gives a hidden width of 4
TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**TOWER, "image_size": 16, "patch_size": 8}
TEXT = {**TOWER, "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 2, "bos_token_id": 1}
BERT = {**TOWER, "vocab_size": 64, "max_position_embeddings": 32, "type_vocab_size": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Family:
    model_class: str
    make_config: Callable[[], transformers.PretrainedConfig]
    branches: tuple[str, ...] = ("text", "vision")


FAMILIES = [
    Family("CLIPModel", lambda: transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=D)),
    Family(
        "CLIPVisionModelWithProjection",
        lambda: transformers.CLIPVisionConfig(**VISION, projection_dim=D),
        ("vision",),
    ),
    Family("CLIPTextModelWithProjection", lambda: transformers.CLIPTextConfig(**TEXT, projection_dim=D), ("text",)),
    Family(
        "MetaClip2Model",
        lambda: transformers.MetaClip2Config(text_config=TEXT, vision_config=VISION, projection_dim=D),
    ),
    Family(
        "MetaClip2VisionModelWithProjection",
        lambda: transformers.MetaClip2VisionConfig(**VISION, projection_dim=D),
        ("vision",),
    ),
    Family(
        "MetaClip2TextModelWithProjection",
        lambda: transformers.MetaClip2TextConfig(**TEXT, projection_dim=D),
        ("text",),
    ),
    Family(
        "Aimv2Model",
        lambda: transformers.Aimv2Config(
            text_config={**TEXT, "num_key_value_heads": 2}, vision_config=VISION, projection_dim=D
        ),
    ),
    Family(
        "ChineseCLIPModel",
        lambda: transformers.ChineseCLIPConfig(text_config=BERT, vision_config=VISION, projection_dim=D),
    ),
    Family(
        "AltCLIPModel",
        lambda: transformers.AltCLIPConfig(
            text_config={**BERT, "project_dim": 16, "max_position_embeddings": 34},
            vision_config=VISION,
            projection_dim=D,
        ),
    ),
    Family(
        "CLIPSegModel",
        lambda: transformers.CLIPSegConfig(text_config=TEXT, vision_config=VISION, projection_dim=D),
    ),
    Family("OwlViTModel", lambda: transformers.OwlViTConfig(text_config=TEXT, vision_config=VISION, projection_dim=D)),
    Family("Owlv2Model", lambda: transformers.Owlv2Config(text_config=TEXT, vision_config=VISION, projection_dim=D)),
    Family(
        "BlipModel",
        lambda: transformers.BlipConfig(
            text_config={**BERT, "encoder_hidden_size": 16}, vision_config=VISION, projection_dim=D
        ),
    ),
    Family(
        "VisionTextDualEncoderModel",
        lambda: transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            transformers.ViTConfig(**VISION), transformers.BertConfig(**BERT), projection_dim=D
        ),
    ),
]

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
INPUT_IDS = torch.tensor([[1, 5, 7, 9, 2], [1, 6, 8, 3, 2]])


def build(family: Family) -> torch.nn.Module:
    """The family's tiny model with the same random weights on every call."""
    torch.manual_seed(0)
    return getattr(transformers, family.model_class)(family.make_config()).eval()


@torch.no_grad()
def embeddings(model: torch.nn.Module, branch: str) -> torch.Tensor:
    """The unnormalised pooled embedding of ``branch`` (what the adapter sees and returns)."""
    if branch == "vision":
        getter, kwargs, key = "get_image_features", {"pixel_values": PIXELS}, "image_embeds"
    else:
        getter, kwargs, key = "get_text_features", {"input_ids": INPUT_IDS}, "text_embeds"
    if hasattr(model, getter):
        return getattr(model, getter)(**kwargs).pooler_output  # [2, D]
    return getattr(model(**kwargs), key)  # single-tower *WithProjection models: [2, D]


@pytest.fixture(params=FAMILIES, ids=lambda family: family.model_class)
def family(request) -> Family:
    return request.param


def test_adapter_wraps_the_pooled_projections_and_changes_the_embeddings(family):
    peft_model = get_peft_model(build(family), CLIPAdapterConfig(adapt="both", reduction=4))
    layers = adapter_layers(peft_model)
    assert tuple(sorted(layers)) == family.branches

    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == len(family.branches) * 2 * D * (D // 4)
    for branch, layer in layers.items():
        adapted = embeddings(peft_model, branch)
        with peft_model.disable_adapter():
            base = embeddings(peft_model, branch)
        assert adapted.shape == base.shape == (2, D)
        assert not torch.allclose(adapted, base)
        # The embedding the model returns is exactly the adapter applied to the base embedding.
        torch.testing.assert_close(adapted, layer.adapt(base), rtol=0, atol=0)


def test_save_load_round_trip_is_bit_identical(family, tmp_path):
    peft_model = get_peft_model(build(family), CLIPAdapterConfig(adapt="both", ratio=0.5))
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(family), tmp_path)
    for branch in family.branches:
        assert torch.equal(embeddings(reloaded, branch), embeddings(peft_model, branch))


def test_align_has_no_image_projection():
    align = transformers.AlignModel(transformers.AlignConfig(text_config=BERT, projection_dim=D))
    with pytest.raises(ValueError, match=r"matches no module of AlignModel.*\['text_projection'\]"):
        get_peft_model(align, CLIPAdapterConfig(adapt="vision"))
    assert sorted(adapter_layers(get_peft_model(align, CLIPAdapterConfig(adapt="both")))) == ["text"]


def test_groupvit_sequential_projections_are_refused():
    groupvit = transformers.GroupViTModel(transformers.GroupViTConfig(text_config=TEXT, projection_dim=D))
    with pytest.raises(ValueError, match=r"'visual_projection' \(Sequential\), which is not a pooled projection"):
        get_peft_model(groupvit, CLIPAdapterConfig(adapt="vision"))
