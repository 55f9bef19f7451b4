"""The model card written beside a saved CLIP-Adapter: metadata for the Hub and a usage snippet."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from peft_clip_adapter.config import CLIPAdapterConfig

TAGS = ("peft", "clip-adapter")


def render_model_card(
    config: CLIPAdapterConfig,
    *,
    base_model: Optional[str] = None,
    repo_id: Optional[str] = None,
    base_model_class: str = "CLIPModel",
    results: Optional[Mapping[str, Any]] = None,
    existing: Optional[ModelCard] = None,
) -> ModelCard:
    """Build the model card of an adapter saved with ``config``.

    Args:
        config: The adapter's config.
        base_model: Hub id or path of the base model (default: ``config.base_model_name_or_path``).
        repo_id: Where the adapter lives (Hub id or folder), used in the usage snippet.
        base_model_class: The transformers class the snippet loads the base model with.
        results: Optional facts about training (dataset, shots, accuracy, ...), shown as a table.
        existing: A card to update (peft writes one first); its metadata and tags are kept.

    Returns:
        A ``huggingface_hub.ModelCard`` whose text shows ``import peft_clip_adapter``, which must run
        before ``PeftModel.from_pretrained`` can resolve ``"peft_type": "CLIP_ADAPTER"``.

    Example:
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> card = render_model_card(CLIPAdapterConfig(base_model_name_or_path="openai/clip-vit-base-patch16"))
        >>> sorted(card.data.tags)[:2], "import peft_clip_adapter" in card.text
        (['base_model:adapter:openai/clip-vit-base-patch16', 'clip-adapter'], True)
    """
    data = existing.data if existing is not None else ModelCardData()
    base_model = base_model or config.base_model_name_or_path
    tags = set(data.tags or []) | set(TAGS)
    # The Hub refuses a README whose `base_model` is not a model id (peft's card writes local paths
    # and '' there), which would make push_to_hub fail after training: local paths stay in the text only.
    tags = {tag for tag in tags if not tag.startswith("base_model:")}
    data.base_model = base_model if _is_hub_id(base_model) else None
    if data.base_model:
        tags.add(f"base_model:adapter:{base_model}")
    data.tags = sorted(tags)
    data.library_name = "peft"
    data.pipeline_tag = "zero-shot-image-classification"
    if results and _is_hub_id(str(results.get("dataset") or "")):
        data.datasets = [str(results["dataset"])]

    base_name = base_model or "<base model id or path>"
    adapter_id = repo_id or "<this adapter's repo id or folder>"
    lines = [
        "# CLIP-Adapter",
        "",
        f"A [CLIP-Adapter](https://arxiv.org/abs/2110.04544) for `{base_name}`: a residual bottleneck MLP "
        "on CLIP's pooled, projected embedding, `f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f`, "
        "trained with the class-name prompts as the classifier. Only the adapter is stored here.",
        "",
        "## Usage",
        "",
        "`import peft_clip_adapter` registers the method with peft; without it, peft cannot read "
        "this adapter's config (`KeyError: 'CLIP_ADAPTER'`).",
        "",
        "```python",
        "import peft_clip_adapter  # pip install peft-clip-adapter",
        "from peft import PeftModel",
        f"from transformers import AutoProcessor, {base_model_class}",
        "",
        f'base = {base_model_class}.from_pretrained("{base_name}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_id}")',
        f'processor = AutoProcessor.from_pretrained("{base_name}")',
        "```",
        "",
        "## Adapter",
        "",
        "| setting | value |",
        "|---|---|",
        f"| adapted branch | {config.adapt or config.target_modules} |",
        f"| ratio (residual blend) | {config.ratio} |",
        f"| reduction | {config.reduction} |",
    ]
    if results:
        lines += ["", "## Training results", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in results.items()]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ text }}\n")
    card.text = "\n".join(lines) + "\n"
    return card


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_hub_id(name: Optional[str]) -> bool:
    """Whether ``name`` can stand in the card's metadata: a Hub repository id, not a local path."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
