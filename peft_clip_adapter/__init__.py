"""CLIP-Adapter as a PEFT method for Hugging Face ``transformers`` contrastive dual encoders (CLIP, SigLIP, ...).

Importing the package registers the method with ``peft``; afterwards the usual peft calls work::

    import peft_clip_adapter
    from peft import get_peft_model
    model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig(ratio=0.2))

The few-shot toolkit (class prototypes, k-shot sampling, preprocessing and the frozen-feature cache) is
importable from here too, for users who write their own training loop.
"""

from peft_clip_adapter.classifier import CLIPAdapterClassifier, encode_class_prompts
from peft_clip_adapter.config import CLIPAdapterConfig
from peft_clip_adapter.data import (
    build_eval_transform,
    build_train_transform,
    class_names,
    load_image_classification_data,
    sample_few_shot,
)
from peft_clip_adapter.features import FeatureCache, FeatureSet, extract_image_features
from peft_clip_adapter.few_shot_classifier import FewShotClassifier
from peft_clip_adapter.layer import CLIPAdapterLayer
from peft_clip_adapter.model import CLIPAdapterModel, adapter_layers, projection_modules
from peft_clip_adapter.peft_model import CLIPAdapterPeftModel
from peft_clip_adapter.registration import PEFT_TYPE, CLIPAdapterPeftType, register
from peft_clip_adapter.search import search_hyperparameters, set_ratio

register()

__version__ = "0.1.0"

__all__ = [
    "PEFT_TYPE",
    "CLIPAdapterClassifier",
    "CLIPAdapterConfig",
    "CLIPAdapterLayer",
    "CLIPAdapterModel",
    "CLIPAdapterPeftModel",
    "CLIPAdapterPeftType",
    "FeatureCache",
    "FeatureSet",
    "FewShotClassifier",
    "adapter_layers",
    "build_eval_transform",
    "build_train_transform",
    "class_names",
    "encode_class_prompts",
    "extract_image_features",
    "load_image_classification_data",
    "projection_modules",
    "register",
    "sample_few_shot",
    "search_hyperparameters",
    "set_ratio",
]
