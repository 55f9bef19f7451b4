"""Zero-shot classification from class names and prompt templates, and its adapted version.

Two steps, as in open_clip's ``zero_shot_classifier``:

1. ``encode_class_prompts`` runs the frozen text encoder ONCE over every class x template prompt and
   returns the raw pooled embeddings ``[C, T, D]`` (class batches, prompts padded as the model was
   trained: to the longest prompt for CLIP, to the fixed length for SigLIP).
2. ``CLIPAdapterClassifier`` turns pooled image (or CLAP audio) embeddings into logits. It re-applies
   only the adapters on each call: the vision adapter on the image embedding, the text adapter on each
   cached prompt embedding, so training on cached features never re-runs either encoder.

Orientation: ``text_weights()`` is ``[D, C]`` (one column per class), so ``logits = image @ weights``.
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
    """Frozen text embeddings of every class name in every prompt template.

    Class names are cleaned (``_`` -> space) and filled into each template (a string with ``{}`` or a
    callable). Prompts are tokenized as the model was trained (see ``prompt_padding``) and encoded in
    batches of whole classes, with every adapter disabled and without gradients: the result is the raw
    pooled text embedding (CLIP's ``text_projection`` output, SigLIP's text head output, ...), to which
    ``CLIPAdapterClassifier`` applies the text adapter (if any) on each step.

    Args:
        model: A ``PeftModel`` around a supported model with a text tower, or a plain one (``CLIPModel``,
            ``SiglipModel``, ``CLIPTextModelWithProjection``, ...).
        tokenizer: The model's processor (preferred: SigLIP 2's declares its text length) or its tokenizer.
        classnames: One name per class, in label order.
        templates: One template or a sequence of them.
        batch_size: Most prompts per forward pass; batches always hold whole classes (at least one).

    Returns:
        ``[C, T, D]`` float32 tensor on the model's device: class ``c``, template ``t``.

    Raises:
        ValueError: for no class names, duplicate class names (also once ``_`` became a space),
            ``batch_size < 1``, an empty template list, a template without ``{}``, or a model without a
            text tower.

    Example:
        >>> import tempfile
        >>> from transformers import AutoProcessor, CLIPModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> clip, processor = CLIPModel.from_pretrained(path), AutoProcessor.from_pretrained(path)
        >>> prompts = encode_class_prompts(clip, processor, ["red circle", "green square"],
        ...                                ["a photo of a {}.", "itap of a {}."])
        >>> prompts.shape, prompts.dtype
        (torch.Size([2, 2, 32]), torch.float32)
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
    """How to pad class prompts for ``model``: as its checkpoints were trained, like the zero-shot pipeline.

    SigLIP's text embedding is the state of the LAST token, padding included, and its checkpoints were
    trained on prompts padded to a fixed length; padded otherwise, the embedding changes. So every
    ``siglip*`` model type gets ``padding="max_length"`` with the processor's length: the text length its
    processor declares (SigLIP 2), else the tokenizer's ``model_max_length``, else the text tower's
    ``max_position_embeddings`` (64 for the released checkpoints, as transformers' pipeline assumes).
    Other models pool a token that does not move with padding, so prompts pad to the longest in a batch.

    Args:
        model: The model, possibly wrapped by peft.
        processor: Its processor or tokenizer.

    Returns:
        Keyword arguments for the tokenizer call.

    Example:
        >>> import tempfile
        >>> from transformers import AutoProcessor, SiglipModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_model
        >>> path = build_tiny_model(tempfile.mkdtemp(), family="siglip")
        >>> prompt_padding(SiglipModel.from_pretrained(path), AutoProcessor.from_pretrained(path))
        {'padding': 'max_length', 'max_length': 64, 'truncation': True}
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
    """CLIP-Adapter's classification head over pooled embeddings: adapters, class prompts, logit scale.

    ``forward`` maps RAW (pre-adapter) pooled image embeddings ``f`` to logits::

        logits = exp(logit_scale) * normalize(vision_adapter(f)) @ text_weights() + logit_bias

    where ``text_weights()`` applies the text adapter to each cached prompt embedding, normalises it,
    averages over templates and renormalises (open_clip's ensemble). ``logit_scale`` (and SigLIP's
    ``logit_bias``, 0 for other models) are the model's own learned values, copied and frozen; ``scores``
    turns logits into what the model's own zero-shot pipeline shows (softmax over classes, SigLIP's
    sigmoid per class). The adapter layers are the model's own modules, so their parameters are shared:
    training this head trains the ``PeftModel``, and ``save_pretrained`` on the ``PeftModel`` saves the
    result. Without adapters (a plain ``CLIPModel``) it is the model's zero-shot head.

    Args:
        class_embeddings: ``[C, T, D]`` frozen prompt embeddings from ``encode_class_prompts``.
        logit_scale: The model's ``logit_scale`` (the log of the temperature's inverse), a scalar.
        vision_adapter: The adapter layer of the embedding being classified (the image tower's; CLAP's
            audio tower's), or ``None``.
        text_adapter: The adapter layer of the text tower, or ``None``.
        logit_bias: SigLIP's ``logit_bias``; ``None`` (no bias, softmax scores) for other models.

    Raises:
        ValueError: if ``class_embeddings`` is not ``[C, T, D]`` or its width does not match an adapter.

    Example:
        >>> import tempfile
        >>> from peft import get_peft_model
        >>> from transformers import AutoProcessor, CLIPModel
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> model = get_peft_model(CLIPModel.from_pretrained(path), CLIPAdapterConfig(adapt="both"))
        >>> prompts = encode_class_prompts(model, AutoProcessor.from_pretrained(path), ["red circle", "blue triangle"])
        >>> head = CLIPAdapterClassifier.from_model(model, prompts)
        >>> head(torch.randn(5, 32)).shape
        torch.Size([5, 2])
        >>> sum(p.numel() for p in head.parameters() if p.requires_grad)  # two 32 -> 8 -> 32 adapters
        1024
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
        """Build the head from a (peft-wrapped) model: its adapter layers, ``logit_scale`` and ``logit_bias``.

        The scale is the model's ``logit_scale`` as its forward uses it (CLAP: ``logit_scale_a``, for audio
        against text; ALIGN: ``-log(temperature)``; AIMv2: clamped to its ceiling); SigLIP's
        ``logit_bias`` is taken too.

        Args:
            model: A ``PeftModel`` made with ``CLIPAdapterConfig``, or a plain supported model (zero-shot).
            class_embeddings: ``[C, T, D]`` from ``encode_class_prompts``.
            logit_scale: Overrides the model's; required for models without one (the single-tower
                classes such as ``CLIPVisionModelWithProjection``).

        Returns:
            A classifier on the device of ``class_embeddings`` that shares the model's adapter parameters.

        Raises:
            ValueError: if the model has no ``logit_scale`` and none is given (or as ``__init__``).

        Example:
            See the class example; with a plain ``CLIPModel`` the head is CLIP's zero-shot classifier.
        """
        inner = unwrap_model(model)
        if logit_scale is None:
            logit_scale = _model_logit_scale(inner)
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
        """``C``, the number of classes (rows of ``class_embeddings``)."""
        return self.class_embeddings.shape[0]

    def text_weights(self) -> torch.Tensor:
        """The class prototypes ``[D, C]``: text adapter per prompt, normalise, mean over templates, renormalise.

        Recomputed on every call, so a training text adapter's gradient reaches its weights.

        Returns:
            ``[D, C]`` unit-norm columns, one per class.

        Example:
            >>> head = CLIPAdapterClassifier(torch.randn(3, 2, 4), logit_scale=0.0)  # 3 classes, 2 templates
            >>> weights = head.text_weights()
            >>> weights.shape, torch.allclose(weights.norm(dim=0), torch.ones(3))
            (torch.Size([4, 3]), True)
        """
        prompts = self.class_embeddings  # [C, T, D]
        if self.text_adapter is not None:
            prompts = self.text_adapter.adapt(prompts)  # [C, T, D]
        prototypes = F.normalize(prompts, dim=-1).mean(dim=1)  # [C, D]
        return F.normalize(prototypes, dim=-1).T  # [D, C]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` from raw pooled image embeddings ``[N, D]`` (before any adapter).

        Args:
            image_features: ``[N, D]`` pooled, projected image embeddings (e.g. from the feature cache).

        Returns:
            ``[N, C]`` float32 logits, scaled by ``exp(logit_scale)`` and shifted by ``logit_bias``.

        Raises:
            ValueError: if ``image_features`` is not ``[N, D]`` with the prompts' width ``D``.

        Example:
            >>> head = CLIPAdapterClassifier(torch.randn(3, 2, 4), logit_scale=0.0)  # 3 classes, 2 templates
            >>> head(torch.randn(5, 4)).shape
            torch.Size([5, 3])
            >>> head(torch.randn(5, 8))
            Traceback (most recent call last):
            ...
            ValueError: image_features must be [N, 4] pooled embeddings, got shape (5, 8).
        """
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
        """Logits ``[N, C]`` from embeddings the vision adapter has already been applied to.

        ``forward`` applies the adapter first; this is for embeddings taken from the adapted model
        itself (e.g. ``get_image_features`` of the ``PeftModel``).

        Args:
            features: ``[N, D]`` adapted pooled embeddings.

        Returns:
            ``[N, C]`` float32 logits.

        Example:
            >>> head = CLIPAdapterClassifier(torch.randn(3, 1, 4), logit_scale=0.0, logit_bias=-1.0)
            >>> f = torch.randn(2, 4)
            >>> torch.equal(head.logits_of_adapted(f), head(f))  # no adapter: the same
            True
        """
        features = F.normalize(features.float(), dim=-1)  # [N, D]
        return self.logit_scale.exp() * features @ self.text_weights() + self.logit_bias  # [N, C]

    def scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """Class scores ``[N, C]`` as the model's zero-shot pipeline shows them.

        A softmax over classes for CLIP-like models; for SigLIP (a model with ``logit_bias``) the sigmoid
        of each logit, ``sigmoid(exp(logit_scale) * cos + logit_bias)``: independent per-class
        probabilities, as SigLIP was trained.

        Args:
            image_features: ``[N, D]`` raw pooled embeddings, as for ``forward``.

        Returns:
            ``[N, C]`` float32 scores in ``[0, 1]``.

        Example:
            >>> head = CLIPAdapterClassifier(torch.randn(3, 1, 4), logit_scale=0.0)
            >>> head.scores(torch.randn(2, 4)).sum(dim=-1)  # softmax: each row sums to 1
            tensor([1.0000, 1.0000])
        """
        logits = self(image_features)  # [N, C]
        return torch.sigmoid(logits) if self.sigmoid_scores else logits.softmax(dim=-1)


def _model_logit_scale(model: nn.Module) -> Optional[torch.Tensor]:
    """The log of the inverse temperature, under each family's name for it."""
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
    """Refuse classes whose prompts encode to the same prototype; return the pairs that nearly do.

    Two classes with one prototype get the same logit for every image, so neither zero-shot nor a
    trained adapter can tell them apart, and training sits at a constant loss. It happens when the
    tokenizer maps the distinguishing words to the same tokens (e.g. words it does not know).

    Args:
        class_embeddings: ``[C, T, D]`` from ``encode_class_prompts``.
        classnames: The ``C`` class names, in the same order.
        near_duplicate_cosine: Pairs whose prototypes' cosine similarity exceeds this are returned.

    Returns:
        ``(name, name, cosine)`` for every pair above ``near_duplicate_cosine`` (most similar first);
        empty when all classes are well apart. Callers decide whether to warn.

    Raises:
        ValueError: naming every pair of classes whose prototypes are identical, or for a
            ``classnames`` whose length is not ``C``.

    Example:
        >>> prompts = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 2.0]]])  # [C=3, T=1, D=2]
        >>> check_class_prototypes(prompts[:2], ["cat", "dog"])
        []
        >>> check_class_prototypes(prompts, ["cat", "dog", "puppy"])
        Traceback (most recent call last):
        ...
        ValueError: Classes 'dog' and 'puppy' have identical prompt embeddings, ...
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
