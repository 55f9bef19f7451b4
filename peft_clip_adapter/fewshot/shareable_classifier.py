"""``FewShotClassifier``: an adapted CLIP together with the classes it was trained for, ready to share.

A saved adapter alone does not say what it classifies, so the class names and prompt templates are saved
beside it, in ``class_prompts.json`` (``{"class_names": [...], "templates": [...]}``), and
``FewShotClassifier.from_pretrained`` rebuilds the classifier the trainer evaluated: base model, adapter,
prompts and the trainer's eval preprocessing::

    classifier = FewShotClassifier.from_pretrained("me/clip-adapter-eurosat")
    classifier("field.jpg")  # [{"score": 0.91, "label": "AnnualCrop"}, {"score": 0.04, ...}, ...]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts
from peft_clip_adapter.fewshot.embeddings import frozen_image_embeddings, model_device, unwrap_model
from peft_clip_adapter.fewshot.inputs.images import load_image
from peft_clip_adapter.fewshot.inputs.transforms import build_eval_transform, move_model_inputs, stack_model_inputs
from peft_clip_adapter.fewshot.logs import quiet_peft_wrapping
from peft_clip_adapter.fewshot.templates import DEFAULT_TEMPLATE, fill_template
from peft_clip_adapter.model_card import CLASS_PROMPTS_FILE, CardFacts
from peft_clip_adapter.peft_model import CLIPAdapterPeftModel

#: Keyword arguments of ``from_pretrained`` that also apply to downloading the adapter's own files.
_HUB_KWARGS = ("token", "cache_dir", "force_download", "local_files_only")


class FewShotClassifier:
    """Classify images into the classes a CLIP-Adapter was trained for; load, save and push it as one.

    Calling it returns, per image, the classes best first, as transformers' zero-shot image pipeline does:
    ``[{"score": 0.91, "label": "AnnualCrop"}, ...]``: a softmax over ``exp(logit_scale) * cos(adapted image
    embedding, class prototype)`` (for SigLIP, one sigmoid per class with ``logit_bias``).

    Args:
        model: The adapted ``PeftModel``, or a plain ``CLIPModel`` for CLIP's own zero-shot classifier (which
            cannot be saved).
        processor: The base model's processor.
        class_names: One name per class, in label order.
        templates: Prompt templates, strings with one ``{}`` (saved as JSON).
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        class_names: Sequence[str],
        templates: Union[str, Sequence[str]] = DEFAULT_TEMPLATE,
        *,
        batch_size: int = 32,
    ) -> None:
        templates = [templates] if isinstance(templates, str) else list(templates)
        for template in templates:
            if not isinstance(template, str):
                raise ValueError(
                    f"FewShotClassifier templates must be strings with '{{}}' (they are saved as JSON), got "
                    f"{template!r}."
                )
            fill_template(template, "class")  # refuses a template without exactly one {}
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        self.model = model.eval()
        self.processor = processor
        self.class_names = list(class_names)
        self.templates = templates
        self.batch_size = batch_size
        self._transform = build_eval_transform(getattr(processor, "image_processor", processor))
        prompts = encode_class_prompts(model, processor, self.class_names, self.templates)  # [C, T, D]
        self.head = CLIPAdapterClassifier.from_model(model, prompts)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        base_model: Union[str, os.PathLike, nn.Module, None] = None,
        *,
        processor: Any = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> FewShotClassifier:
        """Load what ``save_pretrained`` (or the trainer) saved, from a folder or a Hub repository.

        ``base_model`` (a Hub id, a folder or a loaded model) defaults to the one the adapter config names, and
        ``processor`` to the base model's. ``**kwargs`` go to the base model's ``from_pretrained``; ``token``,
        ``cache_dir``, ``force_download`` and ``local_files_only`` also to the adapter's files. Raises
        ``ValueError`` for a missing or malformed ``class_prompts.json`` or a base model that cannot be found.
        """
        from peft import PeftModel
        from transformers import AutoModel, AutoProcessor

        from peft_clip_adapter.adapter_checks import from_pretrained_safetensors
        from peft_clip_adapter.config import CLIPAdapterConfig
        from peft_clip_adapter.model_card import is_hub_id

        source = os.fspath(path_or_hub_id)
        hub = {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}
        prompts = _read_class_prompts(source, revision=revision, **hub)  # first: it is small and may be missing
        config = CLIPAdapterConfig.from_pretrained(source, revision=revision, **hub)
        if base_model is None:
            base_model = config.base_model_name_or_path
            if not base_model or not (os.path.exists(base_model) or is_hub_id(base_model)):
                raise ValueError(
                    f"The adapter {source!r} does not name a base model this machine can load "
                    f"(base_model_name_or_path={base_model!r}); pass base_model= with the CLIP model it was "
                    "trained on: its Hub id, a folder, or a loaded model."
                )
            kwargs.setdefault("revision", config.revision)
        if isinstance(base_model, nn.Module):
            model, model_source = base_model, getattr(base_model, "name_or_path", None)
        else:
            model_source = os.fspath(base_model)
            model = from_pretrained_safetensors(AutoModel, model_source, **kwargs)  # a pickle is never unpickled
        if processor is None:
            if not model_source:
                raise ValueError(
                    "The base model has no name_or_path to load its processor from; pass processor= "
                    "(AutoProcessor.from_pretrained(<base model id>))."
                )
            processor = AutoProcessor.from_pretrained(model_source, revision=kwargs.get("revision"), **hub)
        with quiet_peft_wrapping():
            adapted = PeftModel.from_pretrained(model, source, revision=revision, **hub)
        return cls(adapted, processor, prompts["class_names"], prompts["templates"])

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        training_results: Optional[dict[str, Any]] = None,
        license: Optional[str] = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Save the adapter, its config, ``class_prompts.json`` and the model card in one folder, as one set.

        ``training_results`` (dataset, shots, accuracy, ...) and ``license`` go into the card; ``**kwargs`` to
        ``CLIPAdapterPeftModel.save_pretrained``. Only the main process writes (``is_main_process``).
        """
        self._adapted_model().save_pretrained(
            os.fspath(save_directory),
            is_main_process=is_main_process,
            **self._shared(training_results, license),
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        training_results: Optional[dict[str, Any]] = None,
        license: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> Any:
        """Upload what ``save_pretrained`` writes to the Hub repository ``repo_id`` (created if needed), in one
        commit; ``**hub_kwargs`` go to ``CLIPAdapterPeftModel.push_to_hub``. Returns the ``CommitInfo``."""
        return self._adapted_model().push_to_hub(repo_id, **self._shared(training_results, license), **hub_kwargs)

    def _shared(self, training_results: Optional[dict[str, Any]], license: Optional[str]) -> dict[str, Any]:
        """The files and card facts this classifier adds to the adapter's save."""
        prompts = {"class_names": self.class_names, "templates": self.templates}
        facts = CardFacts(
            results=training_results, class_names=self.class_names, templates=self.templates, license=license
        )
        return {
            "extra_files": {CLASS_PROMPTS_FILE: json.dumps(prompts, indent=2, ensure_ascii=False)},
            "card_facts": facts,
        }

    @torch.no_grad()
    def logits(self, images: Sequence[Any]) -> torch.Tensor:
        """The logits ``[N, C]`` of images (anything ``load_image`` reads), as the trainer evaluates them."""
        device = model_device(unwrap_model(self.model))
        dtype = next((p.dtype for p in unwrap_model(self.model).parameters() if p.is_floating_point()), torch.float32)
        chunks = [torch.empty(0, len(self.class_names), device=device)]
        for start in range(0, len(images), self.batch_size):
            batch = [self._transform(load_image(image)) for image in images[start : start + self.batch_size]]
            inputs = move_model_inputs(stack_model_inputs(batch), device, dtype)  # pixel_values [B, 3, H, W], ...
            features = frozen_image_embeddings(self.model, **inputs).float()  # [B, D]
            chunks.append(self.head(features))  # [B, C]
        return torch.cat(chunks)  # [N, C]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, C]`` from logits: a softmax, or for SigLIP one sigmoid per class."""
        return torch.sigmoid(logits) if self.head.sigmoid_scores else logits.softmax(dim=-1)

    def __call__(self, images: Any, top_k: Optional[int] = None) -> list:
        """Score one image or a list against every class: per image, ``[{"score", "label"}, ...]`` best first (ties
        keep the class order), cut to the ``top_k`` best when given."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a whole number >= 1 (or None for every class), got {top_k!r}.")
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        scores = self.scores(self.logits(batch)).cpu().tolist()  # [N, C]
        results = []
        for row in scores:
            # As the zero-shot pipeline: sorted by score, a stable sort keeping the class order for ties.
            ranked = sorted(zip(row, self.class_names, strict=True), key=lambda pair: -pair[0])
            results.append([{"score": score, "label": label} for score, label in ranked[:top_k]])
        return results[0] if single else results

    def to(self, device: Union[str, torch.device]) -> FewShotClassifier:
        """Move the model and the class prototypes to ``device``; returns ``self``."""
        self.model.to(device)
        self.head.to(device)
        return self

    def _adapted_model(self) -> CLIPAdapterPeftModel:
        if not isinstance(self.model, CLIPAdapterPeftModel):
            raise ValueError(
                f"Only a classifier around a CLIP-Adapter PeftModel can be saved, got {type(self.model).__name__}: "
                "wrap the model with peft.get_peft_model(model, CLIPAdapterConfig(...)) first."
            )
        return self.model


def _read_class_prompts(source: str, *, revision: Optional[str], **hub: Any) -> dict[str, list[str]]:
    """The checked content of ``class_prompts.json`` in a folder or Hub repository."""
    if os.path.isdir(source):
        path: Optional[str] = os.path.join(source, CLASS_PROMPTS_FILE)
        path = path if os.path.isfile(path) else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(source, CLASS_PROMPTS_FILE, revision=revision, **hub)
        except EntryNotFoundError:
            path = None
    if path is None:
        raise ValueError(
            f"{source!r} has no {CLASS_PROMPTS_FILE}: the adapter was saved without its classes. Load it with "
            "peft.PeftModel.from_pretrained, or build FewShotClassifier(model, processor, class_names, templates) "
            "and save that."
        )
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{CLASS_PROMPTS_FILE} of {source!r} is not valid JSON ({error}).") from error
    if not (
        isinstance(prompts, dict)
        and all(
            isinstance(prompts.get(key), list) and prompts[key] and all(isinstance(item, str) for item in prompts[key])
            for key in ("class_names", "templates")
        )
    ):
        raise ValueError(
            f'{CLASS_PROMPTS_FILE} of {source!r} must hold {{"class_names": [...], "templates": [...]}}, two '
            "non-empty lists of strings."
        )
    return prompts
