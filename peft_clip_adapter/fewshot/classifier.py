"""Zero-shot classification from class names and prompt templates, and its adapted version.

As open_clip's ``zero_shot_classifier``: ``encode_class_prompts`` runs the frozen text encoder once over every
class x template prompt (``[C, T, D]``); ``CLIPAdapterClassifier`` then re-applies only the adapters on each
call, so training on cached features never re-runs either encoder. ``text_weights()`` is ``[D, C]`` (one
column per class): ``logits = image @ weights``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from peft_clip_adapter.fewshot.embeddings import frozen_text_embeddings, model_device, unwrap_model
from peft_clip_adapter.fewshot.templates import (
    DEFAULT_TEMPLATE,
    Template,
    as_template_list,
    clean_classname,
    fill_template,
)
from peft_clip_adapter.layer import CLIPAdapterLayer
from peft_clip_adapter.model import adapter_layers


def encode_class_prompts(
    model: nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Union[Template, Sequence[Template]] = DEFAULT_TEMPLATE,
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """Frozen text embeddings of every class name in every template: ``[C, T, D]`` float32 on the model's device.

    Names are cleaned (``_`` -> space), filled into each template (a string with ``{}`` or a callable), padded
    as the model was trained (``prompt_padding``) and encoded with adapters disabled, in batches of whole
    classes of at most ``batch_size`` prompts. ``tokenizer``: the processor (SigLIP 2's declares its text
    length) or the tokenizer.

    Raises ``ValueError`` for no class names, duplicates (also once ``_`` became a space), ``batch_size < 1``,
    no templates, a template without ``{}``, or a model without a text tower.
    """
    classnames = list(classnames)
    if not classnames:
        raise ValueError("classnames is empty; pass one name per class, in label order.")
    # Compared as they appear in the prompts: "red_circle" and "red circle" would get one prototype.
    cleaned = [clean_classname(name) for name in classnames]
    duplicates = sorted({name for name, clean in zip(classnames, cleaned, strict=True) if cleaned.count(clean) > 1})
    if duplicates:
        raise ValueError(f"classnames has duplicates {duplicates}; two classes with one name cannot be told apart.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    templates = as_template_list(templates)
    padding = prompt_padding(model, tokenizer)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor too
    device = model_device(unwrap_model(model))
    classes_per_batch = max(1, batch_size // len(templates))

    chunks = []
    for start in range(0, len(classnames), classes_per_batch):
        batch = classnames[start : start + classes_per_batch]
        prompts = [fill_template(template, clean_classname(name)) for name in batch for template in templates]
        tokens = tokenizer(prompts, return_tensors="pt", **padding).to(device)
        embeddings = frozen_text_embeddings(model, tokens["input_ids"], tokens.get("attention_mask"))  # [B*T, D]
        chunks.append(embeddings.float().reshape(len(batch), len(templates), -1))  # [B, T, D]
    return torch.cat(chunks)  # [C, T, D]


def prompt_padding(model: nn.Module, processor: Any) -> dict[str, Any]:
    """Tokenizer padding for ``model``'s class prompts, as its checkpoints were trained (like the zero-shot pipeline).

    SigLIP embeds the LAST token, padding included, and was trained on fixed-length prompts: ``siglip*`` models
    get ``padding="max_length"`` with the processor's declared length, else the tokenizer's
    ``model_max_length``, else the text tower's ``max_position_embeddings`` (64 for the released checkpoints).
    Other models pad to the longest prompt.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if "siglip" not in str(getattr(config, "model_type", "")):
        return {"padding": True, "truncation": True}
    declared = (getattr(processor, "text_kwargs", None) or {}).get("max_length")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_length, int) and tokenizer_length > 100_000:
        tokenizer_length = None  # transformers' "no limit" placeholder
    text_config = getattr(config, "text_config", config)
    length = declared or tokenizer_length or getattr(text_config, "max_position_embeddings", None) or 64
    return {"padding": "max_length", "max_length": int(length), "truncation": True}


class CLIPAdapterClassifier(nn.Module):
    """CLIP-Adapter's head over RAW (pre-adapter) pooled embeddings ``f``::

        logits = exp(logit_scale) * normalize(vision_adapter(f)) @ text_weights() + logit_bias

    ``text_weights()`` applies the text adapter to each cached prompt, normalises, averages over templates and
    renormalises. ``logit_scale`` (and SigLIP's ``logit_bias``, else 0) are the model's own values, frozen. The
    adapter layers are the model's modules, so training this head trains the ``PeftModel``; without adapters it
    is the zero-shot head.

    Args:
        logit_scale: The log of the inverse temperature, a scalar.
        vision_adapter: The adapter of the embedding being classified (the image tower's; CLAP's audio tower's).
        logit_bias: SigLIP's; ``None`` (softmax scores) for other models.

    Raises ``ValueError`` if ``class_embeddings`` is not ``[C, T, D]`` or its width does not match an adapter.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        vision_adapter: Optional[CLIPAdapterLayer] = None,
        text_adapter: Optional[CLIPAdapterLayer] = None,
        logit_bias: Union[torch.Tensor, float, None] = None,
    ) -> None:
        super().__init__()
        if class_embeddings.dim() != 3:
            raise ValueError(
                f"class_embeddings must be [C, T, D] (classes, templates, width), got shape "
                f"{tuple(class_embeddings.shape)}; for a single template pass embeddings[:, None, :]."
            )
        width = class_embeddings.shape[-1]
        for branch, layer in (("vision", vision_adapter), ("text", text_adapter)):
            if layer is not None and layer.width != width:
                raise ValueError(
                    f"The {branch} adapter works on width {layer.width}, but class_embeddings have "
                    f"width {width}; encode the prompts with the same model."
                )
        self.vision_adapter = vision_adapter
        self.text_adapter = text_adapter
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())  # [C, T, D]
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=class_embeddings.device)
        self.register_buffer("logit_scale", scale.detach().clone())  # frozen: a buffer, never a parameter
        # SigLIP's bias shifts every class's logit alike: it changes the sigmoid scores, never a softmax or
        # a cross-entropy over classes (so training over classes is unaffected by it), nor the argmax.
        self.sigmoid_scores = logit_bias is not None
        bias = torch.as_tensor(0.0 if logit_bias is None else logit_bias, dtype=torch.float32)
        self.register_buffer("logit_bias", bias.to(class_embeddings.device).detach().clone().reshape(()))

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        class_embeddings: torch.Tensor,
        *,
        logit_scale: Union[torch.Tensor, float, None] = None,
    ) -> CLIPAdapterClassifier:
        """The head of a (peft-wrapped) model: its adapter layers, ``logit_scale`` and ``logit_bias``.

        The scale is the one its forward uses: CLAP's ``logit_scale_a``, ALIGN's ``-log(temperature)``, AIMv2's
        clamped scale. ``logit_scale`` must be given for models without one (single towers), else ``ValueError``.
        """
        inner = unwrap_model(model)
        if logit_scale is None:
            logit_scale = model_logit_scale(inner)
            if logit_scale is None:
                raise ValueError(
                    f"{type(inner).__name__} has no `logit_scale`; pass logit_scale=... (the log "
                    "of the inverse temperature, from the dual encoder these towers come from)."
                )
        layers = adapter_layers(model)
        query = layers.get("vision", layers.get("audio"))
        return cls(class_embeddings, logit_scale, query, layers.get("text"), getattr(inner, "logit_bias", None))

    @property
    def num_classes(self) -> int:
        """``C``, the number of classes."""
        return self.class_embeddings.shape[0]

    def text_weights(self) -> torch.Tensor:
        """Class prototypes ``[D, C]`` (unit columns): adapt each prompt, normalise, mean over templates, renormalise.

        Recomputed on every call, so a training text adapter's gradient reaches its weights.
        """
        prompts = self.class_embeddings  # [C, T, D]
        if self.text_adapter is not None:
            prompts = self.text_adapter.adapt(prompts)  # [C, T, D]
        prototypes = F.normalize(prompts, dim=-1).mean(dim=1)  # [C, D]
        return F.normalize(prototypes, dim=-1).T  # [D, C]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` float32 from raw pooled embeddings ``[N, D]``; ``ValueError`` for another shape."""
        width = self.class_embeddings.shape[-1]
        if image_features.dim() != 2 or image_features.shape[-1] != width:
            raise ValueError(
                f"image_features must be [N, {width}] pooled embeddings, got shape {tuple(image_features.shape)}."
            )
        features = image_features.float()
        if self.vision_adapter is not None:
            features = self.vision_adapter.adapt(features)  # [N, D]
        return self.logits_of_adapted(features)

    def logits_of_adapted(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` from embeddings the vision adapter already adapted (the adapted model's output)."""
        features = F.normalize(features.float(), dim=-1)  # [N, D]
        return self.logit_scale.exp() * features @ self.text_weights() + self.logit_bias  # [N, C]

    def scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """Scores ``[N, C]`` in ``[0, 1]`` as the zero-shot pipeline shows them (SigLIP: a sigmoid per class)."""
        logits = self(image_features)  # [N, C]
        return torch.sigmoid(logits) if self.sigmoid_scores else logits.softmax(dim=-1)


def model_logit_scale(model: nn.Module) -> Optional[torch.Tensor]:
    """The log of the inverse temperature a dual encoder's forward uses, under each family's name; ``None`` if none."""
    for name in ("logit_scale", "logit_scale_a"):  # CLAP: audio-to-text logits use logit_scale_a
        value = getattr(model, name, None)
        if value is not None:
            ceiling = getattr(model, "max_log_logit_scale", None)  # AIMv2 clamps its scale in forward
            return value if ceiling is None else value.detach().clamp(0.0, ceiling)
    temperature = getattr(model, "temperature", None)  # ALIGN divides the cosine by its temperature
    if isinstance(temperature, torch.Tensor):
        return -torch.log(temperature.detach())
    return None


#: Prototypes closer than this cosine similarity are reported as nearly identical.
NEAR_DUPLICATE_COSINE = 0.99
# Float noise of encoding identical prompts in different batches stays far below this.
_IDENTICAL_COSINE = 1.0 - 1e-6


def check_class_prototypes(
    class_embeddings: torch.Tensor,
    classnames: Sequence[str],
    *,
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE,
) -> list[tuple[str, str, float]]:
    """Refuse classes whose prompts encode to one prototype; return ``(name, name, cosine)`` of pairs that nearly do.

    Two such classes get the same logit for every image, so nothing can tell them apart (a tokenizer that does
    not know the distinguishing words). Pairs above ``near_duplicate_cosine`` come back most similar first;
    callers decide whether to warn. Raises ``ValueError`` naming every identical pair, or when ``classnames`` is
    not ``C`` long.
    """
    classnames = list(classnames)
    if class_embeddings.dim() != 3 or class_embeddings.shape[0] != len(classnames):
        raise ValueError(
            f"class_embeddings must be [C, T, D] with C = {len(classnames)} class names, got shape "
            f"{tuple(class_embeddings.shape)}."
        )
    prototypes = F.normalize(F.normalize(class_embeddings.float(), dim=-1).mean(dim=1), dim=-1)  # [C, D]
    similarity = prototypes @ prototypes.T  # [C, C]
    first, second = torch.triu_indices(len(classnames), len(classnames), offset=1)
    pairs = sorted(
        (
            (classnames[i], classnames[j], similarity[i, j].item())
            for i, j in zip(first.tolist(), second.tolist(), strict=True)
        ),
        key=lambda pair: -pair[2],
    )
    identical = [f"{a!r} and {b!r}" for a, b, cosine in pairs if cosine >= _IDENTICAL_COSINE]
    if identical:
        raise ValueError(
            f"Classes {'; '.join(identical)} have identical prompt embeddings, so no classifier can tell them "
            "apart. The tokenizer likely does not know the words that differ (check the class names' spelling "
            "and language), or the templates hide them; rename the classes or change --templates."
        )
    return [pair for pair in pairs if pair[2] > near_duplicate_cosine]
