"""``CLIPAdapterModel``: the peft tuner that injects CLIP-Adapter layers into contrastive dual encoders."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any, ClassVar, Optional

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from peft_clip_adapter.adapter_checks import check_adapter_name, check_adapter_tensors, current_source
from peft_clip_adapter.config import CLIPAdapterConfig
from peft_clip_adapter.families import (
    BRANCHES,
    Tower,
    branch_of_module_path,
    describe_towers,
    find_towers,
    select_towers,
)
from peft_clip_adapter.layer import PREFIX, CLIPAdapterLayer

MODEL_TAG = "clip-adapter"


def projection_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every not yet adapted module of ``model`` whose output is a tower's final pooled embedding, by full name."""
    return {
        name: tower.module
        for name, tower in find_towers(model).items()
        if not isinstance(tower.module, CLIPAdapterLayer)
    }


def adapter_layers(model: nn.Module) -> dict[str, CLIPAdapterLayer]:
    """The CLIP-Adapter layers of a ``PeftModel``, its tuner or their base model, by branch (``"vision"``, ...).

    A training loop on cached embeddings calls ``layer.adapt(features)`` on these. Raises ``ValueError`` if a
    branch holds more than one adapter layer (the embedding would be ambiguous).
    """
    layers: dict[str, CLIPAdapterLayer] = {}
    for module in model.modules():
        if not isinstance(module, CLIPAdapterLayer):
            continue
        if module.branch in layers:
            raise ValueError(f"The model holds more than one {module.branch} adapter layer; expected one.")
        layers[module.branch] = module
    return layers


class CLIPAdapterModel(BaseTuner):
    """CLIP-Adapter (Gao et al., https://arxiv.org/abs/2110.04544) as a peft tuner; ``get_peft_model`` builds it.

    Wraps the module whose output is a tower's final pooled embedding (``peft_clip_adapter.families``), so that
    ``forward``, ``get_image_features``, ``get_text_features`` and the zero-shot pipelines all see the adapted
    embedding. The adapter is non-linear, so merging is refused; ``unload()`` returns the untouched base model.
    """

    prefix: str = PREFIX
    tuner_layer_cls = CLIPAdapterLayer
    # Targets come from `adapt` through peft_clip_adapter.families, per model class, not per model_type.
    target_module_mapping: dict[str, list[str]] = {}
    # Called with each new tuner; peft_integration.register() sets it to make the owning PeftModel ours.
    _on_create: ClassVar[Callable[[CLIPAdapterModel], None]] = staticmethod(lambda tuner: None)

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._on_create(self)

    def _pre_injection_hook(self, model: nn.Module, config: CLIPAdapterConfig, adapter_name: str) -> None:
        # Runs once, when get_peft_model or PeftModel.from_pretrained builds the tuner (add_adapter and
        # load_adapter check their names in CLIPAdapterPeftModel).
        check_adapter_name(adapter_name)
        _refuse_wrapped_model(model)

    def _prepare_adapter_config(self, peft_config: CLIPAdapterConfig, model_config: dict) -> CLIPAdapterConfig:
        # Runs before anything is injected, for every adapter (get_peft_model, add_adapter, load_adapter).
        # The stored config keeps `adapt`; the copy used for injection names this model's exact modules,
        # so one saved adapter fits CLIPModel and its single towers, SiglipModel and SiglipVisionModel, ...
        if not isinstance(peft_config, CLIPAdapterConfig):
            raise ValueError(f"Expected a CLIPAdapterConfig, got {type(peft_config).__name__}.")
        towers = self._towers_to_adapt(peft_config)
        prepared = copy.copy(peft_config)
        prepared.target_modules = "|".join(re.escape(name) for name in towers)  # matched in full by peft
        return prepared

    def _towers_to_adapt(self, config: CLIPAdapterConfig) -> dict[str, Tower]:
        if config.target_modules is None:
            return select_towers(self.model, config.adapt)
        towers = find_towers(self.model)
        model_name = type(self.model).__name__
        # An earlier adapter's layer stands for its tower; its insides (base layer, adapters) are not targets.
        inner = tuple(
            f"{name}." for name, module in self.model.named_modules() if isinstance(module, CLIPAdapterLayer)
        )
        matched = [
            name
            for name, _ in self.model.named_modules()
            if name and not name.startswith(inner) and _matches(config.target_modules, name)
        ]
        if not matched:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no module of {model_name}. "
                f"Its pooled-embedding modules are {sorted(towers)}; adapt='vision' / 'text' / 'audio' / 'both' "
                "picks them for you."
            )
        for name in matched:
            if name not in towers:
                module = self.model.get_submodule(name)
                raise ValueError(
                    f"target_modules={config.target_modules!r} matches '{name}' ({type(module).__name__}), which "
                    f"does not output a tower's final pooled embedding (it works per token, or inside a tower). "
                    f"CLIP-Adapter only wraps {model_name}'s pooled-embedding modules: {describe_towers(self.model)}."
                )
        return {name: towers[name] for name in matched}

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
        tower = find_towers(self.model)[current_key]
        new_module = CLIPAdapterLayer(
            target,
            adapter_name,
            peft_config,
            branch=tower.branch,
            width=tower.width,
            channels_first=tower.kind == "pool",
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, CLIPAdapterLayer):
            # unload(): the wrapped module goes back as it is (peft's version would copy a `weight` onto it,
            # which a pooling head does not have).
            setattr(parent, child_name, new_module)
            return
        if next(child.parameters(), None) is not None:
            super()._replace_module(parent, child_name, new_module, child)  # adapters follow the child's device
            return
        # A parameter-free pooling (ALIGN's image side) has no device of its own: follow its tower's.
        setattr(parent, child_name, new_module)
        new_module.to(next(parent.parameters()).device)

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
        state_dict = _onto_this_models_towers(model, config, state_dict)
        _check_saved_branches(model, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_loaded_keys(model, adapter_name, remapped)
        return remapped


def _matches(target_modules: list[str] | str, name: str) -> bool:
    """peft's matching rule: a regex matches the full name; a list entry is the name or a dotted suffix of it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _onto_this_models_towers(
    model: nn.Module, config: CLIPAdapterConfig, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's modules to this model's modules of the same branch.

    An adapter saved from ``SiglipModel`` holds ``vision_model.head`` keys, which ``SiglipVisionModel``
    calls ``head``: the table tells each saved module's branch, and this model's layer of that branch
    takes its weights. Checkpoints that already fit are returned as they are.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, CLIPAdapterLayer)}
    saved = {key.rpartition("." + PREFIX)[0] for key in state_dict if "." + PREFIX in key}
    if saved <= set(layers):
        return state_dict
    layer_of_branch = {layer.branch: name for name, layer in layers.items()}
    candidates = BRANCHES if config.adapt in (None, "both") else (config.adapt,)
    renames = {}
    for path in saved - set(layers):
        branch = branch_of_module_path(path, candidates)
        if branch in layer_of_branch and layer_of_branch[branch] not in saved:
            renames[path] = layer_of_branch[branch]
    renamed = {}
    for key, value in state_dict.items():
        path, separator, rest = key.rpartition("." + PREFIX)
        renamed[f"{renames[path]}{separator}{rest}" if path in renames else key] = value
    return renamed


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


def _check_saved_branches(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights saved for other towers of this very model than the ones this adapter's config adapts."""

    def module_of(key: str) -> str:
        return key.removeprefix("base_model.model.").rpartition(f".{PREFIX}")[0]

    adapted = {module_of(key) for key in _adapter_keys(model, adapter_name)}
    saved = {module_of(key) for key in state_dict}
    towers = {name.removeprefix("base_model.model.") for name in find_towers(model)}
    if saved and saved <= towers and saved != adapted:
        raise ValueError(
            f"{current_source()} does not fit its config in this model: the config adapts {sorted(adapted)}, but the "
            f"file holds adapter weights for {sorted(saved)}. The config and the weights come from different saves: "
            "save the adapter again."
        )


def _check_loaded_keys(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that does not hold exactly this adapter's weights, with the shapes the model needs."""
    expected = _adapter_keys(model, adapter_name)
    # Weights of towers this model lacks are ignored, as peft does (a single tower loads its own adapter from
    # one trained on the full model); a key of the model's own weights would overwrite them.
    overwriting = sorted(key for key in state_dict if key not in expected and key in model.state_dict())
    if overwriting:
        raise ValueError(
            f"{current_source()} holds {overwriting[0]!r}, which is the base model's own weight; loading it would "
            "change the model beyond the adapter, so nothing was loaded. Save the adapter with save_pretrained, "
            "which writes only its weights."
        )
    missing = sorted(key for key in expected if key not in state_dict)
    if missing:
        raise ValueError(
            f"The checkpoint has no weights for {missing}: it was saved for other towers or modules "
            "(check `adapt` in its adapter_config.json)."
        )
    _check_shapes({key: tuple(shape) for key, shape in expected.items()}, state_dict, source=None)


def _check_shapes(expected: dict[str, tuple[int, ...]], loaded: dict[str, Any], source: Optional[str]) -> None:
    """Name an embedding-width mismatch as such, and a bottleneck-width mismatch as a ``reduction`` mismatch."""
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
            f"{source or current_source()} does not fit this model at '{key}': it was trained for an embedding "
            f"width d={loaded_width} (tensor shape {actual}), but this model's embedding width is d={width} "
            f"(expected shape {shape}). Load it into the model variant it was trained on."
        )
