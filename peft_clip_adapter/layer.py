"""The CLIP-Adapter layer: a projection ``nn.Linear`` followed by the residual bottleneck MLP."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F


class CLIPAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps a projection layer (``visual_projection`` or ``text_projection``) with CLIP-Adapter.

    The wrapped layer's output ``f`` (CLIP's pooled, projected embedding, width ``d``) becomes::

        f' = ratio * ReLU(up(ReLU(down(f)))) + (1 - ratio) * f

    with ``down: d -> d // reduction`` and ``up: d // reduction -> d``, both without bias and with
    PyTorch's default initialisation, as in the paper's reference code. Several adapters may live in
    one layer (one ``ModuleDict`` entry each); when several are active they are applied in order.

    The adapter computes in its own dtype (float32 when peft upcasts the adapter of a bf16/fp16 base,
    which it does by default) and casts its result back, so the layer's output dtype always equals the
    base layer's.

    Args:
        base_layer: The projection ``nn.Linear`` to wrap; its ``out_features`` is the adapter width ``d``.
        adapter_name: Name of the first adapter (peft's default is ``"default"``).
        config: A ``CLIPAdapterConfig``; its ``ratio``, ``reduction`` and ``inference_mode`` are used.

    Raises:
        ValueError: if ``config.reduction`` is larger than ``d`` (the bottleneck would have width 0).

    Example:
        >>> import torch
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> from peft_clip_adapter.layer import CLIPAdapterLayer
        >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    adapter_layer_names = ("clip_adapter_down", "clip_adapter_up")
    other_param_names = ("clip_adapter_ratio",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.clip_adapter_down = nn.ModuleDict()
        self.clip_adapter_up = nn.ModuleDict()
        self.clip_adapter_ratio: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create (or replace) the adapter ``adapter_name`` with ``config.ratio`` and ``config.reduction``.

        Args:
            adapter_name: Key of the adapter in the layer's ``ModuleDict`` s.
            config: A ``CLIPAdapterConfig`` (``ratio``, ``reduction``, ``inference_mode``).

        Returns:
            None; the new adapter's weights live on the base layer's device.

        Raises:
            ValueError: if ``config.reduction`` is larger than the projection width ``d``.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
            >>> layer.update_layer("wide", CLIPAdapterConfig(reduction=1))
            >>> layer.clip_adapter_down["wide"].weight.shape
            torch.Size([4, 4])
            >>> layer.update_layer("bad", CLIPAdapterConfig(reduction=8))
            Traceback (most recent call last):
            ...
            ValueError: reduction=8 is larger than the projection width d=4, ...
        """
        width = self.out_features
        if config.reduction > width:
            raise ValueError(
                f"reduction={config.reduction} is larger than the projection width d={width}, which "
                f"would leave a bottleneck of width 0. Use a reduction in [1, {width}]."
            )
        hidden = width // config.reduction
        self.clip_adapter_down[adapter_name] = nn.Linear(width, hidden, bias=False)
        self.clip_adapter_up[adapter_name] = nn.Linear(hidden, width, bias=False)
        self.clip_adapter_ratio[adapter_name] = config.ratio
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the active adapter(s) to already projected embeddings ``[..., d]``.

        This is the layer's forward without the base projection: it lets a training loop run the
        frozen backbone once, cache its pooled embeddings and train the adapter on the cache.

        Args:
            features: Pooled, projected embeddings ``[..., d]``, any float dtype.

        Returns:
            A tensor of the same shape and dtype as ``features``; ``features`` itself when adapters are
            disabled or none is active.

        Raises:
            RuntimeError: from ``torch`` if the last dimension of ``features`` is not ``d``.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig(ratio=0.0))
            >>> f = torch.randn(3, 4)  # [N, d]
            >>> torch.equal(layer.adapt(f), f)  # ratio 0 keeps CLIP's embedding
            True
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
        """The base projection followed by ``adapt``.

        Args:
            x: The projection's input ``[..., in_features]`` (the pooled encoder output).
            *args: Passed to the base layer.
            **kwargs: Passed to the base layer.

        Returns:
            The adapted embedding ``[..., d]`` in the base layer's dtype.

        Raises:
            RuntimeError: from ``torch`` if the last dimension of ``x`` is not ``in_features``.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
            >>> x = torch.randn(2, 8)  # [N, in_features]
            >>> torch.equal(layer(x), layer.adapt(layer.base_layer(x)))
            True
        """
        return self.adapt(self.base_layer(x, *args, **kwargs))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Always refused: a ReLU bottleneck has no equivalent weight matrix to add to the projection.

        Args:
            safe_merge: Ignored (peft's signature).
            adapter_names: Ignored (peft's signature).

        Returns:
            Never returns.

        Raises:
            ValueError: always, pointing to ``unload()`` instead.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
            >>> layer.merge()
            Traceback (most recent call last):
            ...
            ValueError: CLIP-Adapter cannot be merged into the projection weights: ...
        """
        raise ValueError(
            "CLIP-Adapter cannot be merged into the projection weights: its ReLU bottleneck is not "
            "linear, so no single matrix reproduces it. Keep the adapter as a module, or call unload() "
            "to get the base model back without it."
        )

    def unmerge(self) -> None:
        """Do nothing: no adapter is ever merged (see ``merge``).

        Returns:
            None.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig()).unmerge()
        """
        # Nothing is ever merged (see `merge`), so there is nothing to undo.
        return None

    def __repr__(self) -> str:
        return "clip_adapter." + super().__repr__()
