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
    """Wraps the module that outputs a tower's final pooled embedding and adapts that output.

    The wrapped module may be a projection ``nn.Linear`` (CLIP), an MLP block (GroupViT, CLAP), an
    attention-pooling head (SigLIP) or a pooling (ALIGN); its output ``f`` (width ``d``) becomes::

        f' = ratio * ReLU(up(ReLU(down(f)))) + (1 - ratio) * f

    with ``down: d -> d // reduction`` and ``up: d // reduction -> d``, both without bias and with
    PyTorch's default initialisation, as in the paper's reference code. Several adapters may live in
    one layer (one ``ModuleDict`` entry each); when several are active they are applied in order.

    The adapter computes in its own dtype (float32 when peft upcasts the adapter of a bf16/fp16 base,
    which it does by default) and casts its result back, so the layer's output dtype always equals the
    base layer's.

    Args:
        base_layer: The module to wrap; without ``width``, an ``nn.Linear`` whose ``out_features`` is ``d``.
        adapter_name: Name of the first adapter (peft's default is ``"default"``).
        config: A ``CLIPAdapterConfig``; its ``ratio``, ``reduction`` and ``inference_mode`` are used.
        branch: The tower the embedding belongs to (``"vision"``, ``"text"`` or ``"audio"``), if known.
        width: ``d``, when ``base_layer`` is not a Linear (the tuner reads it from
            ``peft_clip_adapter.families``).
        channels_first: The base layer outputs ``[N, d, 1, 1]`` (a pooling of a convolutional feature
            map, ALIGN's image side): the adapter then acts on dimension 1 and the shape is kept.

    Raises:
        ValueError: if ``config.reduction`` is larger than ``d`` (the bottleneck would have width 0).

    Example:
        >>> import torch
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> from peft_clip_adapter.layer import CLIPAdapterLayer
        >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
        >>> layer(torch.randn(2, 8)).shape
        torch.Size([2, 4])
        >>> pooled = CLIPAdapterLayer(torch.nn.AvgPool2d(4), "default", CLIPAdapterConfig(), width=6,
        ...                           channels_first=True)
        >>> pooled(torch.randn(2, 6, 4, 4)).shape  # [N, C, h, w] -> [N, C, 1, 1], C adapted
        torch.Size([2, 6, 1, 1])
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
        self.out_features = self.width  # the name peft's Linear-based layers use
        self.channels_first = channels_first
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create (or replace) the adapter ``adapter_name`` with ``config.ratio`` and ``config.reduction``.

        Args:
            adapter_name: Key of the adapter in the layer's ``ModuleDict`` s.
            config: A ``CLIPAdapterConfig`` (``ratio``, ``reduction``, ``inference_mode``).

        Returns:
            None; the new adapter's weights live on the base layer's device.

        Raises:
            ValueError: if ``config.reduction`` is larger than the embedding width ``d``.

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
            ValueError: reduction=8 is larger than the embedding width d=4, ...
        """
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
        """Apply the active adapter(s) to already pooled embeddings ``[..., d]``.

        This is the layer's forward without the base module: it lets a training loop run the frozen
        backbone once, cache its pooled embeddings and train the adapter on the cache.

        Args:
            features: Pooled embeddings ``[..., d]`` (the base module's output), any float dtype.

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
        """The base module followed by ``adapt``.

        Args:
            x: The base module's input (e.g. the pooled encoder output ``[..., in_features]`` of a projection).
            *args: Passed to the base module (e.g. SigLIP 2's pooling head takes an attention mask).
            **kwargs: Passed to the base module.

        Returns:
            The adapted embedding, of the base module's output shape and dtype.

        Raises:
            RuntimeError: from ``torch`` if ``x`` does not fit the base module.

        Example:
            >>> import torch
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> layer = CLIPAdapterLayer(torch.nn.Linear(8, 4, bias=False), "default", CLIPAdapterConfig())
            >>> x = torch.randn(2, 8)  # [N, in_features]
            >>> torch.equal(layer(x), layer.adapt(layer.base_layer(x)))
            True
        """
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
        """Always refused: a ReLU bottleneck has no equivalent weight matrix to add to the base module.

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
            ValueError: CLIP-Adapter cannot be merged into the base weights: ...
        """
        raise ValueError(
            "CLIP-Adapter cannot be merged into the base weights: its ReLU bottleneck is not "
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
