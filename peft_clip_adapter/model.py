"""``CLIPAdapterModel``: the peft tuner that injects CLIP-Adapter layers into CLIP-style models."""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from peft_clip_adapter.checkpoint import check_adapter_name, check_adapter_tensors, current_source
from peft_clip_adapter.config import PROJECTION_NAMES, CLIPAdapterConfig
from peft_clip_adapter.layer import CLIPAdapterLayer
from peft_clip_adapter.registration import PREFIX

MODEL_TAG = "clip-adapter"


def projection_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module named ``visual_projection`` or ``text_projection`` in ``model``, by full name.

    Layers already wrapped by CLIP-Adapter are left out; their inner ``base_layer`` is not named like a
    projection, so it is not listed either.

    Args:
        model: Any ``nn.Module``, usually a CLIP-style transformers model.

    Returns:
        ``{full module name: module}``; empty when the model has no such projection.

    Example:
        >>> from transformers import CLIPConfig, CLIPModel
        >>> config = CLIPConfig(
        ...     text_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        ...                  "num_attention_heads": 2},
        ...     vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        ...                    "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
        ...     projection_dim=4)
        >>> sorted(projection_modules(CLIPModel(config)))
        ['text_projection', 'visual_projection']
    """
    return {
        name: module
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in PROJECTION_NAMES and not isinstance(module, CLIPAdapterLayer)
    }


def adapter_layers(model: nn.Module) -> dict[str, CLIPAdapterLayer]:
    """The CLIP-Adapter layers in ``model`` keyed by branch: ``"vision"`` and/or ``"text"``.

    Works on a ``PeftModel``, on the tuner or on the base model they wrap. A training loop on cached
    embeddings calls ``layer.adapt(features)`` on these.

    Args:
        model: A ``PeftModel``, a ``CLIPAdapterModel`` or the base model they wrap.

    Returns:
        ``{"vision": layer, "text": layer}``, holding only the adapted branches (empty if none is).

    Raises:
        ValueError: if a branch holds more than one adapter layer (the embedding would be ambiguous).

    Example:
        >>> from peft import get_peft_model
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.offline import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> sorted(adapter_layers(get_peft_model(clip, CLIPAdapterConfig(adapt="both"))))
        ['text', 'vision']
    """
    layers: dict[str, CLIPAdapterLayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, CLIPAdapterLayer):
            continue
        branch = "vision" if name.rpartition(".")[2] == "visual_projection" else "text"
        if branch in layers:
            raise ValueError(f"The model holds more than one {branch} adapter layer; expected one.")
        layers[branch] = module
    return layers


class CLIPAdapterModel(BaseTuner):
    """CLIP-Adapter (Gao et al., https://arxiv.org/abs/2110.04544) as a peft tuner.

    Wraps the ``visual_projection`` and/or ``text_projection`` linears of CLIP-style models
    (``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``, Chinese-CLIP,
    AltCLIP, MetaCLIP 2, ...) so that ``forward``, ``get_image_features``, ``get_text_features`` and
    the zero-shot pipeline all see the adapted embedding. Only the adapters train; they cannot be
    merged (the adapter is non-linear), but ``unload()`` returns the untouched base model.

    Users do not build this class: ``peft.get_peft_model`` does, once ``peft_clip_adapter`` is imported.

    Args:
        model: The base model to adapt (modified in place).
        peft_config: A ``CLIPAdapterConfig`` (or peft's ``{adapter name: config}`` mapping).
        adapter_name: Name of the first adapter.
        **kwargs: Passed to peft's ``BaseTuner``.

    Raises:
        ValueError: if the config is not a ``CLIPAdapterConfig``, the model has no ``visual_projection`` /
            ``text_projection``, ``target_modules`` matches nothing or matches a module other than a
            projection ``Linear``, or on ``merge_adapter()`` / ``merge_and_unload()`` (non-linear adapter).

    Example:
        >>> import peft_clip_adapter
        >>> from peft import get_peft_model
        >>> import tempfile
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.offline import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig(ratio=0.2))
        >>> type(model.base_model).__name__
        'CLIPAdapterModel'
    """

    prefix: str = PREFIX
    tuner_layer_cls = CLIPAdapterLayer
    # Targets always come from the config (`adapt`), never from a per-architecture table.
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        _watch_for_the_owning_peft_model()

    def _prepare_adapter_config(self, peft_config: CLIPAdapterConfig, model_config: dict) -> CLIPAdapterConfig:
        return peft_config

    def _pre_injection_hook(self, model: nn.Module, config: CLIPAdapterConfig, adapter_name: str) -> None:
        if not isinstance(config, CLIPAdapterConfig):
            raise ValueError(f"Expected a CLIPAdapterConfig, got {type(config).__name__}.")
        check_adapter_name(adapter_name)
        _refuse_wrapped_model(model)
        projections = projection_modules(model)
        if not projections:
            raise ValueError(
                f"{type(model).__name__} has no {' / '.join(PROJECTION_NAMES)} layer, so there is no pooled "
                "CLIP embedding to adapt. Use a CLIP-style model such as CLIPModel, "
                "CLIPVisionModelWithProjection or CLIPTextModelWithProjection."
            )
        matched = [name for name, _ in model.named_modules() if check_target_module_exists(config, name)]
        if not matched:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
                f"Its projection modules are {sorted(projections)}; adapt='vision' / 'text' / 'both' "
                "picks them for you."
            )
        for name in matched:
            module = model.get_submodule(name)
            if isinstance(module, CLIPAdapterLayer):
                continue
            if name not in projections or not isinstance(module, nn.Linear):
                raise ValueError(
                    f"target_modules={config.target_modules!r} matches '{name}' ({type(module).__name__}), "
                    f"which is not a pooled projection Linear. CLIP-Adapter only wraps {sorted(projections)}."
                )
        # Weights checked by CLIPAdapterConfig.from_pretrained: refuse another branch or width before injecting.
        saved = getattr(config, "_saved_weight_shapes", None) or {}
        source = getattr(config, "_saved_weights_source", None)
        if saved:
            _check_saved_modules(saved, matched, source)
        _check_shapes(_expected_shapes(model, saved, config.reduction), saved, source=source)

    def _post_injection_hook(self, model: nn.Module, config: CLIPAdapterConfig, adapter_name: str) -> None:
        # transformers models carry tags that end up in the model card.
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([MODEL_TAG])

    def _create_and_replace(
        self,
        peft_config: CLIPAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, CLIPAdapterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = CLIPAdapterLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "CLIP-Adapter cannot be merged into the base model: the adapter is a ReLU MLP applied after "
            "the projection, not a weight delta. Keep the PeftModel for inference, or call unload() to "
            "remove the adapters and get the unchanged base model back."
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: CLIPAdapterConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        # Every load path of peft ends here before the weights reach the model (PeftModel.from_pretrained,
        # load_adapter, AutoPeftModel, set_peft_model_state_dict): refuse anything but this adapter's weights.
        check_adapter_tensors(state_dict, reduction=config.reduction)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_loaded_keys(model, adapter_name, remapped)
        return remapped


# How a plain `PeftModel` becomes a `CLIPAdapterPeftModel`. `get_peft_model`, `PeftModel.from_pretrained`
# and `AutoPeftModel` build a plain `PeftModel` for every method whose `task_type` is None, and peft offers
# no registry for the `PeftModel` class (its task-type table keys on `task_type`, which must stay None so
# that CLIP keeps its own forward). What peft does guarantee is that the `PeftModel` stores its tuner as
# the submodule `base_model` (`peft_model.base_model` is public API). torch calls the global
# module-registration hooks on every submodule assignment, so a hook sees exactly that moment and switches
# the class of that one `PeftModel` instance to our subclass, which keeps every peft behaviour and adds ours
# (atomic saves, our model card and its push). Subclasses of `PeftModel` built on purpose are left alone.
# tests/test_peft_flows.py checks every way of building the model, so a peft change that breaks this fails
# the suite instead of silently pushing peft's generic card.
_owner_hook = None


def _watch_for_the_owning_peft_model() -> None:
    """Install (once per process) the hook that upgrades the ``PeftModel`` that takes a CLIP-Adapter tuner."""
    global _owner_hook
    if _owner_hook is None:
        _owner_hook = register_module_module_registration_hook(_upgrade_owning_peft_model)


def _upgrade_owning_peft_model(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    if name == "base_model" and isinstance(submodule, CLIPAdapterModel) and type(module) is PeftModel:
        # Looked up now, not at import: a reloaded peft_model module then provides the class.
        from peft_clip_adapter.peft_model import CLIPAdapterPeftModel

        module.__class__ = CLIPAdapterPeftModel


def _refuse_wrapped_model(model: nn.Module) -> None:
    """Wrapping again would re-initialise the adapters already there (peft only warns), so refuse it."""
    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model is already a PeftModel (adapters {sorted(model.peft_config)}); wrapping it again would nest "
            "two PeftModels. Add another adapter with model.add_adapter(name, config) or model.load_adapter(path, "
            "name), or call model.unload() to get the plain base model back first."
        )
    wrapped = {
        name for module in model.modules() if isinstance(module, CLIPAdapterLayer) for name in module.clip_adapter_down
    }
    if wrapped:
        raise ValueError(
            f"{type(model).__name__} already holds CLIP-Adapter layers (adapters {sorted(wrapped)}): it was wrapped "
            "by get_peft_model or PeftModel.from_pretrained before (a load that failed leaves them too), and wrapping "
            "it again would re-initialise their weights. Use that PeftModel (add_adapter / load_adapter / "
            "set_adapter), call its unload() first, or start from a freshly loaded base model."
        )


def _adapter_keys(model: nn.Module, adapter_name: str) -> dict[str, torch.Size]:
    """``{state-dict key: shape}`` of the adapter ``adapter_name``'s weights in ``model``."""
    names = set(CLIPAdapterLayer.adapter_layer_names)
    found = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        # ``<module>.<adapter layer>.<adapter name>.weight``: matched by position, not by substring, so that an
        # adapter named like a part of the prefix ("clip", "adapter") selects only its own weights.
        if len(parts) >= 3 and parts[-3] in names and parts[-2] == adapter_name:
            found[key] = value.shape
    return found


def _saved_module(key: str) -> str:
    """``base_model.model.visual_projection.clip_adapter_down.weight`` -> ``visual_projection``."""
    return key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")[0]


def _check_saved_modules(saved: dict[str, tuple[int, ...]], targets: list[str], source: str) -> None:
    """The saved weights must adapt exactly the modules the config targets in this model."""
    modules = {_saved_module(key) for key in saved}
    if modules != set(targets):
        raise ValueError(
            f"{source} does not fit its config in this model: the config targets {sorted(targets)}, but the file "
            f"holds adapter weights for {sorted(modules)}. The config and the weights come from different saves: "
            "save the adapter again."
        )


def _expected_shapes(
    model: nn.Module, saved: dict[str, tuple[int, ...]], reduction: int
) -> dict[str, tuple[int, int]]:
    """The shapes ``saved`` (keys as in a file) must have in ``model`` before injection: ``[d // r, d]`` down,
    ``[d, d // r]`` up, where ``d`` is the width of the module they adapt. Modules of unknown width are skipped
    (the check after injection covers them)."""
    down_name, up_name = CLIPAdapterLayer.adapter_layer_names
    expected = {}
    for key in saved:
        module_name, layer = _saved_module(key), key.removesuffix(".weight").rpartition(".")[2]
        try:
            width = getattr(model.get_submodule(module_name), "out_features", None)
        except AttributeError:
            continue  # a module the model lacks: reported as missing weights after injection
        if isinstance(width, int):
            hidden = width // reduction
            expected[key] = (hidden, width) if layer == down_name else (width, hidden)
    return expected


def _check_loaded_keys(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that does not hold exactly this adapter's weights, with the shapes the model needs."""
    expected = _adapter_keys(model, adapter_name)
    base = model.state_dict()
    unexpected = sorted(key for key in state_dict if key not in expected)
    if unexpected:
        key = unexpected[0]
        what = "the base model's own weight" if key in base else "no weight of this adapter"
        raise ValueError(
            f"{current_source()} holds {key!r}, which is {what}; loading it would change the model beyond the "
            "adapter, so nothing was loaded. Save the adapter with save_pretrained, which writes only its weights."
        )
    missing = sorted(key for key in expected if key not in state_dict)
    if missing:
        raise ValueError(
            f"The checkpoint has no weights for {missing}: it was saved for other projection layers "
            "(check `adapt` in its adapter_config.json)."
        )
    _check_shapes({key: tuple(shape) for key, shape in expected.items()}, state_dict, source=None)


def _check_shapes(expected: dict[str, tuple[int, ...]], loaded: dict[str, Any], source: Optional[str]) -> None:
    """Name a projection-width mismatch as such, and a bottleneck-width mismatch as a ``reduction`` mismatch."""
    down_name = CLIPAdapterLayer.adapter_layer_names[0]
    for key, shape in expected.items():
        actual = tuple(getattr(loaded[key], "shape", loaded[key]))
        if actual == shape:
            continue
        is_down = f".{down_name}." in key
        width, loaded_width = (shape[1], actual[1]) if is_down else (shape[0], actual[0])
        if len(actual) == 2 and loaded_width == width:
            hidden, loaded_hidden = (shape[0], actual[0]) if is_down else (shape[1], actual[1])
            raise ValueError(
                f"{source or current_source()} does not fit this adapter at '{key}': its bottleneck has width "
                f"{loaded_hidden}, but this adapter's reduction gives {hidden} (d={width}). The adapter was trained "
                "with another `reduction`: load it with its own adapter_config.json (or that reduction)."
            )
        raise ValueError(
            f"{source or current_source()} does not fit this model at '{key}': it was trained for a projection "
            f"width d={loaded_width} (tensor shape {actual}), but this model's projection width is "
            f"d={width} (expected shape {shape}). Load it into the CLIP variant it was trained on."
        )
