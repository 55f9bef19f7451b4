"""The one seam to peft, transformers and torch internals: every write into their state happens here.

Each touch says why peft offers no public route. All are verified by the suite at both ends of the supported
range (``.ci/run``): peft 0.21.0 and 0.21.2, transformers 5.13 and 5.25, torch 2.13. ``register()`` (run by
``import peft_clip_adapter``) applies them all, idempotently; none changes what other peft methods observe
(tests/test_peft_integration.py runs LoRA with and without the import, in fresh interpreters, and compares
config reading, errors, saving, loading and warnings).

Private hooks our subclasses override (peft's tuner contract, no public alternative), verified on peft 0.21.0-0.21.2:
``BaseTuner._prepare_adapter_config``, ``_pre_injection_hook``, ``_post_injection_hook``, ``_create_and_replace``,
``_replace_module``, ``_check_merge_allowed``, ``_remap_adapter_state_dict_for_load``; and
``BaseTunerLayer._get_base_layer_device_and_dtype``, ``_move_adapter_to_device_of_base_layer``,
``_cast_input_dtype``; ``PeftModel._split_kwargs`` and ``_get_peft_specific_model_tags``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import weakref
from pathlib import Path
from typing import Any, Optional

from peft import PeftConfig, PeftModel
from peft import mapping as peft_mapping
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from peft_clip_adapter import adapter_checks, config, layer, model, peft_model
from peft_clip_adapter.manifest import MANIFEST_NAME

__all__ = ["register"]


def register() -> None:
    """Make peft resolve ``"peft_type": "CLIP_ADAPTER"`` and apply every touch below; safe to call repeatedly."""
    _register_method()
    _allow_in_zero_shot_pipeline()
    _install_config_file_checks()
    model.CLIPAdapterModel._on_create = staticmethod(_adopt_owning_peft_model)
    peft_model.CLIPAdapterPeftModel._built_by_this_load = staticmethod(_built_by_peft_from_pretrained)


# 1. peft's method registry. `register_peft_method` only accepts names already in peft's closed `PeftType`
# enum, so we own a `str` enum member and write it into the three dicts peft consults (config class, tuner
# class, key prefix). They are mutated, never rebound: peft's modules hold references to them. Assigning
# (not "insert if absent") and reading the classes at call time points peft at fresh classes after a reload.
def _register_method() -> None:
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[config.PEFT_TYPE] = config.CLIPAdapterConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[config.PEFT_TYPE] = model.CLIPAdapterModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[config.PEFT_TYPE] = layer.PREFIX


# 2. transformers' zero-shot image pipeline logs an ERROR for a model class not in its table, though an
# adapted model works there unchanged; the PEFT wrappers it accepts are listed in `SUPPORTED_PEFT_TASKS`, which
# has no registration API. Only our class name is added, in place, once (transformers 5.13-5.25).
def _allow_in_zero_shot_pipeline() -> None:
    from transformers.pipelines import base as pipelines_base

    accepted = pipelines_base.SUPPORTED_PEFT_TASKS.setdefault("zero-shot-image-classification", [])
    if peft_model.CLIPAdapterPeftModel.__name__ not in accepted:
        accepted.append(peft_model.CLIPAdapterPeftModel.__name__)


# 3. The generic reader of adapter_config.json. `PeftModel.from_pretrained`, `load_adapter`,
# `PeftConfig.from_pretrained` and `AutoPeftModel` find out which method saved an adapter through
# `PeftConfig.from_json_file` (`PeftConfig._get_peft_type`), before any method's code runs, and
# `PeftConfig.from_pretrained` then builds `CLIPAdapterConfig(**fields)` without our `from_pretrained`: a
# CLIP-Adapter config missing `ratio` would load the default silently, and a damaged one ends in a bare
# `JSONDecodeError` or `KeyError`. peft has no hook there, so the classmethod is wrapped on `PeftConfig` itself,
# for calls on `PeftConfig` only (method classes such as `LoraConfig` keep peft's reader), and only for files
# that are CLIP-Adapter's (`_is_clip_adapter_config`); every other file goes to peft's own reader untouched,
# with its own errors and warnings. A process-wide wrapper cannot be avoided: the generic read happens before
# anything tells peft which method it is reading. Verified on peft 0.21.0-0.21.2.
def _install_config_file_checks() -> None:
    original = PeftConfig.from_json_file.__func__
    if getattr(original, "_checks_clip_adapter_configs", False):
        return

    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        if cls is PeftConfig and _is_clip_adapter_config(path_json_file):
            return adapter_checks.read_adapter_config(path_json_file, config_name=cls.__name__)
        return original(cls, path_json_file, **kwargs)

    from_json_file.__doc__ = original.__doc__
    from_json_file.__wrapped__ = original
    from_json_file._checks_clip_adapter_configs = True
    PeftConfig.from_json_file = classmethod(from_json_file)


def _is_clip_adapter_config(path: str) -> bool:
    """Whether a config file is CLIP-Adapter's: it says so, or it cannot say and its folder does."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        loaded = None
    peft_type = loaded.get("peft_type") if isinstance(loaded, dict) else None
    if peft_type == config.PEFT_TYPE.value:
        return True
    if isinstance(peft_type, str) and peft_type in peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
        return False  # another method's config: peft's reader, whatever else the folder holds
    if isinstance(loaded, dict) and (
        {"ratio", "reduction"} <= set(loaded) or adapter_checks.did_you_mean(peft_type, [config.PEFT_TYPE.value])
    ):
        return True
    # Unreadable, or with no usable peft_type: CLIP-Adapter's if our save wrote the folder (its manifest) or the
    # weights beside it are CLIP-Adapter weights.
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME)) or _weights_have_our_prefix(folder)


def _weights_have_our_prefix(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(min(length, 1 << 24)))
    except (OSError, struct.error, UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict) and any(f".{layer.PREFIX}" in key for key in header)


# 4. The PeftModel class. `get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModel` build a plain
# `PeftModel` for every method whose `task_type` is None, and peft has no registry for that class (its table
# keys on `task_type`, which must stay None so that the model keeps its own forward). peft does guarantee that
# the `PeftModel` stores its tuner as the submodule `base_model`, and torch reports submodule assignments to
# global module-registration hooks only (there is no per-module one). So the hook is as narrow as torch allows:
# it is installed when the first CLIP-Adapter tuner is built (importing the package installs nothing), and it
# acts only on tuners waiting for their owner, switching the class of the plain `PeftModel` that takes one to
# `CLIPAdapterPeftModel` (which keeps every peft behaviour and adds ours). For any other module it is one
# dictionary look-up. It cannot remove itself once nothing waits: torch is iterating over the hooks when it
# runs. Verified on peft 0.21.0-0.21.2 and torch 2.11-2.13; tests/test_peft_flows.py checks every way of building.
_awaiting_owner: dict[int, weakref.ref] = {}
_owner_hook = None


def _adopt_owning_peft_model(tuner: nn.Module) -> None:
    global _owner_hook
    key = id(tuner)

    def forget(reference: weakref.ref) -> None:  # a tuner that never found an owner is gone
        if _awaiting_owner.get(key) is reference:
            del _awaiting_owner[key]

    _awaiting_owner[key] = weakref.ref(tuner, forget)
    if _owner_hook is None:
        _owner_hook = register_module_module_registration_hook(_upgrade_owning_peft_model)


def _upgrade_owning_peft_model(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
    reference = _awaiting_owner.get(id(submodule))
    if reference is None or reference() is not submodule:
        return
    del _awaiting_owner[id(submodule)]  # the tuner has found its owner (or another parent): stop watching
    if name == "base_model" and type(module) is PeftModel:
        module.__class__ = peft_model.CLIPAdapterPeftModel


# 5. A refused `PeftModel.from_pretrained` must leave the caller's base model as it was, but peft injects the
# adapter layers before it loads the weights, and a config carries no file to check them against beforehand.
# `load_adapter` checks the weights and, when it refuses them, removes the layers only if peft's
# `from_pretrained` built this very model for this load (its local `model`): the one case where the caller
# never receives the `PeftModel` and cannot undo the injection. peft offers no way to tell that call apart.
def _built_by_peft_from_pretrained(candidate: PeftModel) -> bool:
    code = PeftModel.from_pretrained.__func__.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("model") is candidate:
            return True
        frame = frame.f_back
    return False
