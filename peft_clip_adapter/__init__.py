"""CLIP-Adapter as a PEFT method for Hugging Face ``transformers`` CLIP models.

Importing the package registers the method with ``peft``; afterwards the usual peft calls work::

    import peft_clip_adapter
    from peft import get_peft_model
    model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig(ratio=0.2))
"""

from peft_clip_adapter.config import CLIPAdapterConfig
from peft_clip_adapter.layer import CLIPAdapterLayer
from peft_clip_adapter.model import CLIPAdapterModel, adapter_layers, projection_modules
from peft_clip_adapter.peft_model import CLIPAdapterPeftModel
from peft_clip_adapter.registration import PEFT_TYPE, CLIPAdapterPeftType, register

register()

__version__ = "0.1.0"

__all__ = [
    "PEFT_TYPE",
    "CLIPAdapterConfig",
    "CLIPAdapterLayer",
    "CLIPAdapterModel",
    "CLIPAdapterPeftModel",
    "CLIPAdapterPeftType",
    "adapter_layers",
    "projection_modules",
    "register",
]
