"""CLIP-Adapter as a PEFT method for Hugging Face ``transformers`` contrastive dual encoders (CLIP, SigLIP, ...).

Importing the package registers the method with ``peft``; afterwards the usual peft calls work::

    import peft_clip_adapter
    from peft import get_peft_model
    model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig(ratio=0.2))

The few-shot toolkit (``peft_clip_adapter.fewshot``) is importable from here too, lazily: loading a saved
adapter needs the method alone, not ``datasets`` or the toolkit.
"""

from __future__ import annotations

import importlib
from typing import Any

from peft_clip_adapter.config import PEFT_TYPE, CLIPAdapterConfig, CLIPAdapterPeftType
from peft_clip_adapter.layer import CLIPAdapterLayer
from peft_clip_adapter.model import CLIPAdapterModel, adapter_layers, projection_modules
from peft_clip_adapter.model_card import CardFacts
from peft_clip_adapter.peft_integration import register
from peft_clip_adapter.peft_model import CLIPAdapterPeftModel

register()

__version__ = "0.1.0"

# Toolkit names, imported on first use (PEP 562) so that `import peft_clip_adapter` stays light.
_TOOLKIT = {
    "CLIPAdapterClassifier": "classifier",
    "encode_class_prompts": "classifier",
    "build_eval_transform": "data",
    "build_train_transform": "data",
    "class_names": "data",
    "load_image_classification_data": "data",
    "sample_few_shot": "data",
    "FeatureCache": "features",
    "FeatureSet": "features",
    "extract_image_features": "features",
    "FewShotClassifier": "shareable_classifier",
    "search_hyperparameters": "search",
    "set_ratio": "search",
}


def __getattr__(name: str) -> Any:
    if name in _TOOLKIT:
        value = getattr(importlib.import_module(f"peft_clip_adapter.fewshot.{_TOOLKIT[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'peft_clip_adapter' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TOOLKIT])


__all__ = [
    "PEFT_TYPE",
    "CardFacts",
    "CLIPAdapterConfig",
    "CLIPAdapterLayer",
    "CLIPAdapterModel",
    "CLIPAdapterPeftModel",
    "CLIPAdapterPeftType",
    "adapter_layers",
    "projection_modules",
    "register",
    *_TOOLKIT,
]
