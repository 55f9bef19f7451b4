"""Frozen pooled embeddings: a tower run with every CLIP-Adapter disabled, without gradients.

The classifier caches the prompts' text embeddings and the feature cache the image embeddings; both then
re-apply only the adapter. These accept a ``PeftModel``, a model with adapters injected, or a plain supported
model (see ``peft_clip_adapter.families``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from peft_clip_adapter.families import select_towers
from peft_clip_adapter.layer import CLIPAdapterLayer

# Per branch: the dual encoder's method for one tower, and the output field of a single-tower class.
_TOWER_CALLS = {
    "vision": ("get_image_features", "image_embeds"),
    "text": ("get_text_features", "text_embeds"),
    "audio": ("get_audio_features", "audio_embeds"),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` and/or ``DistributedDataParallel`` (a plain module as is)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the frozen backbone: adapters disabled, eval mode, no autograd; restored after.

    Unlike ``PeftModel.disable_adapter()`` it leaves every ``requires_grad`` flag alone (peft re-enables the
    active adapters' gradients on exit) and works on any module. Yields the unwrapped model.
    """
    inner = unwrap_model(model)
    layers = [module for module in inner.modules() if isinstance(module, CLIPAdapterLayer)]
    disabled = [layer._disable_adapters for layer in layers]
    training = [(module, module.training) for module in inner.modules()]
    try:
        for layer in layers:
            layer._disable_adapters = True
        inner.eval()
        with torch.no_grad():
            yield inner
    finally:
        for layer, flag in zip(layers, disabled, strict=True):
            layer._disable_adapters = flag
        for module, flag in training:
            module.training = flag


def _pooled(output: Any, field: str) -> torch.Tensor:
    """The pooled embedding from whatever a tower call returns (a tensor or a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    value: Optional[torch.Tensor] = getattr(output, field, None)
    # transformers 5's get_*_features return a BaseModelOutputWithPooling whose pooler_output is the
    # embedding; single towers without a projection field (SiglipVisionModel, ...) return it there too.
    return value if value is not None else output.pooler_output


def frozen_embeddings(model: nn.Module, branch: str, **inputs: Any) -> torch.Tensor:
    """The pooled ``[N, D]`` embedding of tower ``branch`` (``"vision"``, ``"text"``, ``"audio"``), adapters disabled.

    Runs the model's own ``get_*_features`` (or a single tower's forward) on ``**inputs`` as its processor makes
    them, without gradients: exactly what that tower's adapter receives, in the model's dtype and device. (CLAP
    L2-normalises it; the adapter is positively homogeneous, so that classifies alike.) Raises ``ValueError``
    naming the model class and its towers if it has no such tower.
    """
    select_towers(unwrap_model(model), branch)  # a clear error for a tower the model lacks
    method, field = _TOWER_CALLS[branch]
    with frozen(model) as inner:
        call = getattr(inner, method, inner)  # a single tower has no get_*_features: its forward gives it
        return _pooled(call(**inputs), field)


def frozen_image_embeddings(model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """``[N, 3, H, W]`` images -> ``[N, D]`` (NaFlex: ``[N, patches, 3 * p * p]`` and its two other inputs)."""
    return frozen_embeddings(model, "vision", pixel_values=pixel_values, **inputs)


def frozen_text_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``frozen_embeddings(model, "text", ...)``: ``[N, L]`` token ids (and mask) -> ``[N, D]``."""
    return frozen_embeddings(model, "text", input_ids=input_ids, attention_mask=attention_mask)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
