"""``CLIPAdapterModel``: the peft tuner that injects CLIP-Adapter layers into contrastive dual encoders."""

from __future__ import annotations

import copy
import re

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

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
    """Every module of ``model`` whose output is a tower's final pooled embedding, by full name.

    These are the modules CLIP-Adapter wraps (``visual_projection`` / ``text_projection`` in CLIP, the
    pooling heads in SigLIP, ...; see ``peft_clip_adapter.families``). Modules already wrapped by
    CLIP-Adapter are left out.

    Args:
        model: Any ``nn.Module``, usually a transformers dual encoder.

    Returns:
        ``{full module name: module}``; empty when the model has no such module.

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
        name: tower.module
        for name, tower in find_towers(model).items()
        if not isinstance(tower.module, CLIPAdapterLayer)
    }


def adapter_layers(model: nn.Module) -> dict[str, CLIPAdapterLayer]:
    """The CLIP-Adapter layers in ``model`` keyed by branch: ``"vision"``, ``"text"`` and/or ``"audio"``.

    Works on a ``PeftModel``, on the tuner or on the base model they wrap. A training loop on cached
    embeddings calls ``layer.adapt(features)`` on these.

    Args:
        model: A ``PeftModel``, a ``CLIPAdapterModel`` or the base model they wrap.

    Returns:
        ``{branch: layer}``, holding only the adapted branches (empty if none is).

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
    for module in model.modules():
        if not isinstance(module, CLIPAdapterLayer):
            continue
        if module.branch in layers:
            raise ValueError(f"The model holds more than one {module.branch} adapter layer; expected one.")
        layers[module.branch] = module
    return layers


class CLIPAdapterModel(BaseTuner):
    """CLIP-Adapter (Gao et al., https://arxiv.org/abs/2110.04544) as a peft tuner.

    Wraps the module whose output is a tower's final pooled embedding, found per model class in
    ``peft_clip_adapter.families`` (CLIP's projections, SigLIP's pooling heads, ALIGN's image pooling,
    GroupViT's and CLAP's projection MLPs, ...), so that ``forward``, ``get_image_features``,
    ``get_text_features``, ``get_audio_features`` and the zero-shot pipelines all see the adapted
    embedding. Only the adapters train; they cannot be merged (the adapter is non-linear), but
    ``unload()`` returns the untouched base model.

    Users do not build this class: ``peft.get_peft_model`` does, once ``peft_clip_adapter`` is imported.

    Args:
        model: The base model to adapt (modified in place).
        peft_config: A ``CLIPAdapterConfig`` (or peft's ``{adapter name: config}`` mapping).
        adapter_name: Name of the first adapter.
        **kwargs: Passed to peft's ``BaseTuner``.

    Raises:
        ValueError: if the config is not a ``CLIPAdapterConfig``; if the model has no tower for ``adapt``
            (naming the model class and what it has); if ``target_modules`` matches nothing or a module
            that is not a tower's pooled embedding (e.g. a per-token layer); or on ``merge_adapter()`` /
            ``merge_and_unload()`` (non-linear adapter).

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
    # Targets come from `adapt` through peft_clip_adapter.families, per model class, not per model_type.
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        _watch_for_the_owning_peft_model()

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
        state_dict = _onto_this_models_towers(model, config, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_loaded_shapes(model, adapter_name, remapped)
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


def _check_loaded_shapes(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose adapter does not fit the model, naming both embedding widths."""
    expected = {
        key: value.shape
        for key, value in model.state_dict().items()
        if PREFIX in key and key.endswith(f".{adapter_name}.weight")
    }
    missing = sorted(key for key in expected if key not in state_dict)
    if missing:
        raise ValueError(
            f"The checkpoint has no weights for {missing}: it was saved for other towers or modules "
            "(check `adapt` in its adapter_config.json)."
        )
    for key, shape in expected.items():
        loaded = state_dict[key].shape
        if loaded == shape:
            continue
        width = shape[1] if ".clip_adapter_down." in key else shape[0]
        loaded_width = loaded[1] if ".clip_adapter_down." in key and len(loaded) == 2 else loaded[0]
        raise ValueError(
            f"The adapter checkpoint does not fit this model at '{key}': it was trained for an embedding "
            f"width d={loaded_width} (tensor shape {tuple(loaded)}), but this model's embedding width is "
            f"d={width} (expected shape {tuple(shape)}). Load it into the model variant it was trained on, "
            "and with the same `reduction`."
        )
