"""CLIP's frozen pooled embeddings: the towers run with every CLIP-Adapter disabled, without gradients.

The classifier caches the frozen text embeddings of the class prompts and the feature cache stores the
frozen image embeddings; both then re-apply only the adapter. These helpers accept a ``PeftModel``, a
model with adapter layers injected, or a plain ``CLIPModel`` / ``CLIP*ModelWithProjection``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from peft_clip_adapter.layer import CLIPAdapterLayer


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


def has_module(model: nn.Module, name: str) -> bool:
    """Whether ``model`` holds a submodule whose own name (last dotted part) is ``name``.

    Args:
        model: Any module.
        name: A module's own name, e.g. ``"text_projection"``.

    Returns:
        ``True`` if some submodule's last dotted name part is ``name``.

    Example:
        >>> from torch import nn
        >>> has_module(nn.Sequential(nn.Linear(2, 2)), "0"), has_module(nn.Linear(2, 2), "text_projection")
        (True, False)
    """
    return any(full_name.rpartition(".")[2] == name for full_name, _ in model.named_modules())


def _require_projection(model: nn.Module, name: str, purpose: str) -> None:
    if not has_module(model, name):
        raise ValueError(
            f"{type(model).__name__} has no `{name}` layer, so it gives no pooled CLIP embedding to {purpose}. "
            "Use a CLIPModel, or CLIPVisionModelWithProjection / CLIPTextModelWithProjection for one tower."
        )


def _pooled(output: Any, field: str) -> torch.Tensor:
    """The projected embedding from whatever a CLIP-style method returns (tensor or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    value: Optional[torch.Tensor] = getattr(output, field, None)
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding.
    return value if value is not None else output.pooler_output


def frozen_image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled, projected image embeddings with every adapter disabled, without gradients.

    Args:
        model: A CLIP-style model with a ``visual_projection`` (``CLIPModel``,
            ``CLIPVisionModelWithProjection``), possibly wrapped by peft.
        pixel_values: ``[N, 3, H, W]`` images, preprocessed for this model.

    Returns:
        ``[N, D]`` embeddings in the model's dtype, on the model's device.

    Raises:
        ValueError: if the model has no ``visual_projection``.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.offline import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> frozen_image_embeddings(clip, torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """
    _require_projection(unwrap_model(model), "visual_projection", "adapt")
    with frozen(model) as inner:
        if hasattr(inner, "get_image_features"):
            return _pooled(inner.get_image_features(pixel_values=pixel_values), "image_embeds")
        return _pooled(inner(pixel_values=pixel_values), "image_embeds")


def frozen_text_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """CLIP's pooled, projected text embeddings with every adapter disabled, without gradients.

    Args:
        model: A CLIP-style model with a ``text_projection`` (``CLIPModel``,
            ``CLIPTextModelWithProjection``), possibly wrapped by peft.
        input_ids: ``[N, L]`` token ids.
        attention_mask: ``[N, L]`` mask for padded batches.

    Returns:
        ``[N, D]`` embeddings in the model's dtype, on the model's device.

    Raises:
        ValueError: if the model has no ``text_projection``.

    Example:
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.offline import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> frozen_text_embeddings(clip, torch.tensor([[0, 5, 1]])).shape
        torch.Size([1, 32])
    """
    _require_projection(unwrap_model(model), "text_projection", "build class prototypes from")
    with frozen(model) as inner:
        if hasattr(inner, "get_text_features"):
            output = inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        else:
            output = inner(input_ids=input_ids, attention_mask=attention_mask)
        return _pooled(output, "text_embeds")


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
