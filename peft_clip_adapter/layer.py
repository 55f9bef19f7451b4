"""The CLIP-Adapter layer: the module that outputs a tower's pooled embedding, followed by the residual MLP."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

#: Start of every adapter attribute (and so of every saved key's last parts), as peft requires.
PREFIX = "clip_adapter_"


class CLIPAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps the module that outputs a tower's final pooled embedding ``f`` (width ``d``) and adapts it::

        f' = ratio * ReLU(up(ReLU(down(f)))) + (1 - ratio) * f,   down: d -> d // reduction, up: back to d

    No biases, PyTorch's default init (as the paper's code); one ``ModuleDict`` entry per adapter, active ones
    applied in order. The adapter computes in its own dtype and casts back to the base layer's.
    ``in_features`` and ``out_features`` are ``d``: the adapter maps the embedding to itself.

    Args:
        base_layer: The module to wrap; without ``width``, an ``nn.Linear`` whose ``out_features`` is ``d``.
        config: A ``CLIPAdapterConfig`` (``ratio``, ``reduction``, ``inference_mode``).
        branch: The tower: ``"vision"``, ``"text"`` or ``"audio"``.
        width: ``d``, when ``base_layer`` is not a Linear (read from ``peft_clip_adapter.families``).
        channels_first: The base layer outputs ``[N, d, 1, 1]`` (ALIGN's image pooling); the shape is kept.
    """

    adapter_layer_names = ("clip_adapter_down", "clip_adapter_up")
    other_param_names = ("clip_adapter_ratio",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        *,
        branch: Optional[str] = None,
        width: Optional[int] = None,
        channels_first: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.clip_adapter_down = nn.ModuleDict()
        self.clip_adapter_up = nn.ModuleDict()
        self.clip_adapter_ratio: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.branch = branch
        self.width: int = base_layer.out_features if width is None else width
        # peft's layers expose their widths under these names; the adapter maps the embedding to itself.
        self.in_features = self.out_features = self.width
        self.channels_first = channels_first
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create (or replace) the adapter ``adapter_name``; ``ValueError`` if ``reduction`` exceeds ``d``."""
        width = self.width
        if config.reduction > width:
            raise ValueError(
                f"reduction={config.reduction} is larger than the embedding width d={width}, which "
                f"would leave a bottleneck of width 0. Use a reduction in [1, {width}]."
            )
        hidden = width // config.reduction
        self.clip_adapter_down[adapter_name] = nn.Linear(width, hidden, bias=False)
        self.clip_adapter_up[adapter_name] = nn.Linear(hidden, width, bias=False)
        self.clip_adapter_ratio[adapter_name] = config.ratio
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the active adapter(s) to pooled embeddings ``[..., d]``: the forward without the base module.

        A training loop runs the frozen backbone once, caches its embeddings and trains on them with this.
        Returns the same shape and dtype; ``features`` itself when adapters are disabled.
        """
        if self.disable_adapters:
            return features
        for name in self.active_adapters:
            if name not in self.clip_adapter_down:
                continue
            down, up = self.clip_adapter_down[name], self.clip_adapter_up[name]
            ratio = self.clip_adapter_ratio[name]
            x = self._cast_input_dtype(features, down.weight.dtype)
            residual = F.relu(up(F.relu(down(x))))  # [..., d], non-negative
            # The blend is on the unnormalised feature, as in the paper.
            features = (ratio * residual + (1.0 - ratio) * x).to(features.dtype)
        return features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module (given ``x`` and any other arguments), then ``adapt``."""
        output = self.base_layer(x, *args, **kwargs)
        if self.channels_first:
            # [N, d, 1, 1]: the model itself flattens this to [N, d] next, so adapting the flat view is exact.
            return self.adapt(output.reshape(output.shape[:2])).reshape(output.shape)
        return self.adapt(output)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        # peft reads `base_layer.weight`, which only a Linear has. An MLP block or a pooling head gives its
        # first parameter; a parameter-free pooling gives none, so new adapters follow the existing ones
        # (the tuner places the first one on the tower's device).
        reference = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        if reference is None:
            reference = next(self.clip_adapter_down.parameters(), None)
        return (None, None) if reference is None else (reference.device, reference.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Always refused: a ReLU bottleneck has no equivalent weight to merge; ``unload()`` removes it instead."""
        raise ValueError(
            "CLIP-Adapter cannot be merged into the base weights: its ReLU bottleneck is not "
            "linear, so no single matrix reproduces it. Keep the adapter as a module, or call unload() "
            "to get the base model back without it."
        )

    def unmerge(self) -> None:
        """Nothing to undo: no adapter is ever merged."""
        return None

    def __repr__(self) -> str:
        return "clip_adapter." + super().__repr__()
