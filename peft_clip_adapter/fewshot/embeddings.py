"""Frozen pooled embeddings: a tower runs with every CLIP-Adapter disabled, without gradients.

The classifier caches the frozen text embeddings of the class prompts and the feature cache stores the
frozen image embeddings; both then re-apply only the adapter. These helpers accept a ``PeftModel``, a
model with adapter layers injected, or a plain supported model (``CLIPModel``, ``SiglipModel``, a single
tower such as ``SiglipVisionModel``, ...; see ``peft_clip_adapter.families``).
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
    """The transformers model inside a ``PeftModel`` and/or a ``DistributedDataParallel`` wrapper.

    Args:
        model: A ``PeftModel``, a ``DistributedDataParallel`` wrapper, both, or a plain module.

    Returns:
        The innermost model (a plain module is returned as is).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> unwrap_model(layer) is layer
        True
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as the frozen backbone: adapters disabled, eval mode, no autograd; restored after.

    Unlike ``PeftModel.disable_adapter()``, this leaves every ``requires_grad`` flag untouched (peft
    re-enables gradients of the active adapters on exit, even for a model loaded for inference), and it
    also works on a model that is not a ``PeftModel``.

    Args:
        model: Any module; a ``PeftModel`` is unwrapped.

    Returns:
        A context manager yielding the unwrapped model.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Dropout(0.5)).train()
        >>> with frozen(net) as inner:
        ...     inner.training, torch.is_grad_enabled()
        (False, False)
        >>> net.training
        True
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
    """The pooled embedding of one tower with every adapter disabled, without gradients.

    Runs the dual encoder's own ``get_image_features`` / ``get_text_features`` / ``get_audio_features``,
    or the forward of a single-tower class, so the result is exactly what the adapter of that tower
    receives. (CLAP's ``get_*_features`` L2-normalise it; the adapter is positively homogeneous, so the
    normalised embeddings classify exactly as the raw ones.)

    Args:
        model: A supported model (see ``peft_clip_adapter.families``), possibly wrapped by peft.
        branch: ``"vision"``, ``"text"`` or ``"audio"``.
        **inputs: The tower's inputs, as its processor makes them (``pixel_values``; ``input_ids`` and
            ``attention_mask``; ``input_features``; SigLIP 2's ``pixel_attention_mask`` and ``spatial_shapes``).

    Returns:
        ``[N, D]`` embeddings in the model's dtype, on the model's device.

    Raises:
        ValueError: if the model has no such tower (naming the model class and the towers it has).

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> frozen_embeddings(clip, "text", input_ids=torch.tensor([[0, 5, 1]])).shape
        torch.Size([1, 32])
    """
    select_towers(unwrap_model(model), branch)  # a clear error for a tower the model lacks
    method, field = _TOWER_CALLS[branch]
    with frozen(model) as inner:
        call = getattr(inner, method, inner)  # a single tower has no get_*_features: its forward gives it
        return _pooled(call(**inputs), field)


def frozen_image_embeddings(model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The pooled image embeddings with every adapter disabled, without gradients.

    Args:
        model: A supported model with a vision tower (``CLIPModel``, ``SiglipModel``,
            ``CLIPVisionModelWithProjection``, ...), possibly wrapped by peft.
        pixel_values: ``[N, 3, H, W]`` images, preprocessed for this model (SigLIP 2 NaFlex: its
            processor's ``[N, patches, 3 * p * p]``).
        **inputs: Further inputs of the vision tower (SigLIP 2: ``pixel_attention_mask``, ``spatial_shapes``).

    Returns:
        ``[N, D]`` embeddings in the model's dtype, on the model's device.

    Raises:
        ValueError: if the model has no vision tower.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> frozen_image_embeddings(clip, torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """
    return frozen_embeddings(model, "vision", pixel_values=pixel_values, **inputs)


def frozen_text_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The pooled text embeddings with every adapter disabled, without gradients.

    Args:
        model: A supported model with a text tower (``CLIPModel``, ``SiglipModel``,
            ``CLIPTextModelWithProjection``, ...), possibly wrapped by peft.
        input_ids: ``[N, L]`` token ids.
        attention_mask: ``[N, L]`` mask for padded batches.

    Returns:
        ``[N, D]`` embeddings in the model's dtype, on the model's device.

    Raises:
        ValueError: if the model has no text tower.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> frozen_text_embeddings(clip, torch.tensor([[0, 5, 1]])).shape
        torch.Size([1, 32])
    """
    return frozen_embeddings(model, "text", input_ids=input_ids, attention_mask=attention_mask)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters).

    Args:
        model: Any module.

    Returns:
        The ``torch.device`` of its first parameter, or ``cpu``.

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
