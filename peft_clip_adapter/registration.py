"""Registers CLIP-Adapter with peft's method registry, without touching peft's source.

peft's own ``register_peft_method`` only accepts names that already exist in its closed ``PeftType``
enum, so we own a ``str`` enum member and write it into the three registry dicts peft consults when it
builds a tuner, reads an ``adapter_config.json`` or strips key prefixes. The dicts are mutated in place
(never rebound) because peft's modules hold references to them.
"""

from __future__ import annotations

import enum

from peft import mapping as peft_mapping


class CLIPAdapterPeftType(str, enum.Enum):
    """The ``peft_type`` written to ``adapter_config.json``.

    A ``str`` enum compares and hashes like its value, so the string ``"CLIP_ADAPTER"`` read back from
    JSON finds the same registry entries as the member itself. Like peft's own ``PeftType``, ``str()``
    gives ``"<class>.<name>"``: peft reads the method's name as the part after the dot (e.g. in
    ``PeftModel.get_model_status().peft_types``).

    Raises:
        ValueError: from ``enum`` when looked up with any other value.

    Example:
        >>> from peft_clip_adapter.registration import CLIPAdapterPeftType
        >>> CLIPAdapterPeftType("CLIP_ADAPTER") == "CLIP_ADAPTER", CLIPAdapterPeftType.CLIP_ADAPTER.value
        (True, 'CLIP_ADAPTER')
        >>> str(CLIPAdapterPeftType.CLIP_ADAPTER).partition(".")[-1]
        'CLIP_ADAPTER'
    """

    CLIP_ADAPTER = "CLIP_ADAPTER"


PEFT_TYPE = CLIPAdapterPeftType.CLIP_ADAPTER
PREFIX = "clip_adapter_"


def register() -> None:
    """Make ``peft`` resolve ``"peft_type": "CLIP_ADAPTER"``. Safe to call any number of times.

    ``import peft_clip_adapter`` calls it; call it yourself only after reloading peft's modules. It raises
    nothing of its own.

    Returns:
        None; peft's config, tuner and prefix registries gain (or refresh) the ``CLIP_ADAPTER`` entry, and
        transformers' zero-shot image pipeline accepts the adapted ``PeftModel``.

    Example:
        >>> import peft
        >>> from peft_clip_adapter.registration import register, PEFT_TYPE
        >>> register(); register()
        >>> peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["CLIP_ADAPTER"]
        'clip_adapter_'
    """
    # Imported here so that importing this module stays cheap and free of cycles.
    from peft_clip_adapter.checkpoint import install_config_file_checks
    from peft_clip_adapter.config import CLIPAdapterConfig
    from peft_clip_adapter.model import CLIPAdapterModel
    from peft_clip_adapter.peft_model import _allow_in_zero_shot_pipeline

    # Assigning (rather than "insert if absent") makes a reload of our modules point peft at the fresh
    # classes instead of the stale ones from the first import.
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = CLIPAdapterConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = CLIPAdapterModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    _allow_in_zero_shot_pipeline()
    # peft reads adapter_config.json before any of our code runs; make that read explain a broken file.
    install_config_file_checks()
