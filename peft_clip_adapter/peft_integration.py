"""Registers CLIP-Adapter with peft's method registry, without touching peft's source.

peft's own ``register_peft_method`` only accepts names that already exist in its closed ``PeftType``
enum, so we own a ``str`` enum member and write it into the three registry dicts peft consults when it
builds a tuner, reads an ``adapter_config.json`` or strips key prefixes. The dicts are mutated in place
(never rebound) because peft's modules hold references to them.
"""

from __future__ import annotations

from peft import mapping as peft_mapping

# This module depends on the method's modules, never the other way round: the names peft needs (the
# type, the config, the tuner, the key prefix) live beside what they describe.
from peft_clip_adapter import adapter_checks, config, layer, model, peft_model
from peft_clip_adapter.config import PEFT_TYPE, CLIPAdapterPeftType
from peft_clip_adapter.layer import PREFIX

__all__ = ["PEFT_TYPE", "PREFIX", "CLIPAdapterPeftType", "register"]


def register() -> None:
    """Make ``peft`` resolve ``"peft_type": "CLIP_ADAPTER"``. Safe to call any number of times.

    ``import peft_clip_adapter`` calls it; call it yourself only after reloading peft's modules. It raises
    nothing of its own.

    Returns:
        None; peft's config, tuner and prefix registries gain (or refresh) the ``CLIP_ADAPTER`` entry, and
        transformers' zero-shot image pipeline accepts the adapted ``PeftModel``.

    Example:
        >>> import peft
        >>> from peft_clip_adapter.peft_integration import register, PEFT_TYPE
        >>> register(); register()
        >>> peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["CLIP_ADAPTER"]
        'clip_adapter_'
    """
    # Assigning (rather than "insert if absent"), and reading the classes from their modules at call
    # time, makes a reload of our modules point peft at the fresh classes instead of the stale ones.
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[config.PEFT_TYPE] = config.CLIPAdapterConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[config.PEFT_TYPE] = model.CLIPAdapterModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[config.PEFT_TYPE] = layer.PREFIX
    peft_model._allow_in_zero_shot_pipeline()
    # peft reads adapter_config.json before any of our code runs; make that read explain a broken file.
    adapter_checks.install_config_file_checks()
