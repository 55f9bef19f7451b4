"""``FewShotClassifier``: an adapted CLIP together with the classes it was trained for, ready to share.

A saved adapter alone does not say what it classifies. The trainer (and ``FewShotClassifier.save_pretrained``)
therefore writes the class names and prompt templates beside it, in ``class_prompts.json``::

    {"class_names": ["AnnualCrop", "Forest", ...], "templates": ["a centered satellite photo of {}."]}

and ``FewShotClassifier.from_pretrained`` rebuilds the exact classifier the trainer evaluated: the base
model named in the adapter config, the adapter, those prompts, and the trainer's eval preprocessing
(``build_eval_transform``: the processor's resize and center crop; for SigLIP 2 NaFlex, the processor's
own patches of the whole image).

Example::

    from peft_clip_adapter import FewShotClassifier

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
from peft_clip_adapter.model_card import CLASS_PROMPTS_FILE
from peft_clip_adapter.peft_model import CLIPAdapterPeftModel

#: Keyword arguments of ``from_pretrained`` that also apply to downloading the adapter's own files.
_HUB_KWARGS = ("token", "cache_dir", "force_download", "local_files_only")


class FewShotClassifier:
    """Classify images into the classes a CLIP-Adapter was trained for; load, save and push it as one.

    Calling it scores every image against every class and returns, per image, the classes sorted by
    score, best first, as ``transformers``' zero-shot image pipeline does:
    ``[{"score": 0.91, "label": "AnnualCrop"}, ...]``. The scores are a softmax over the logits
    ``exp(logit_scale) * cos(adapted image embedding, class prototype)`` that the trainer evaluates
    (for SigLIP, one sigmoid per class of those logits plus ``logit_bias``, as its pipeline shows them).

    Args:
        model: The adapted model (a ``PeftModel`` with a CLIP-Adapter), or a plain ``CLIPModel`` for
            CLIP's own zero-shot classifier (which cannot be saved).
        processor: The base model's processor (tokenizer and image processor).
        class_names: One name per class, in label order.
        templates: Prompt templates, strings with one ``{}`` (saved as JSON, so no callables).
        batch_size: Images per forward pass.

    Raises:
        ValueError: for no or duplicate class names, or a template that is not a string with one ``{}``.

    Example:
        >>> import tempfile
        >>> from peft import get_peft_model
        >>> from PIL import Image
        >>> from transformers import AutoProcessor, CLIPModel
        >>> from peft_clip_adapter import CLIPAdapterConfig
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> path = build_tiny_clip(tempfile.mkdtemp())
        >>> model = get_peft_model(CLIPModel.from_pretrained(path), CLIPAdapterConfig())
        >>> classifier = FewShotClassifier(model, AutoProcessor.from_pretrained(path), ["red circle", "blue cross"])
        >>> predictions = classifier(Image.new("RGB", (40, 30), "red"))
        >>> [sorted(prediction) for prediction in predictions]
        [['label', 'score'], ['label', 'score']]
        >>> classifier.save_pretrained(tempfile.mkdtemp())
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
        """Load the classifier saved in a folder or Hub repository: base model, adapter, classes and templates.

        Args:
            path_or_hub_id: A folder written by ``save_pretrained`` (or by ``examples/fewshot.py``), or a
                Hub repository id.
            base_model: The base model: a Hub id, a folder or a loaded model. Default: the one named in
                ``adapter_config.json`` (``base_model_name_or_path``).
            processor: The base model's processor. Default: loaded from where the base model comes from.
            revision: The adapter repository's revision (branch, tag or commit).
            **kwargs: Passed to the base model's ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``);
                ``token``, ``cache_dir``, ``force_download`` and ``local_files_only`` also apply to the
                adapter's files.

        Returns:
            The classifier, in eval mode, on the base model's device.

        Raises:
            ValueError: if the adapter has no ``class_prompts.json`` (it was saved without a classifier) or a
                malformed one, or if the base model is neither given nor recorded as something loadable.

        Example:
            >>> import tempfile
            >>> from peft import get_peft_model
            >>> from transformers import AutoProcessor, CLIPModel
            >>> from peft_clip_adapter import CLIPAdapterConfig
            >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
            >>> path = build_tiny_clip(tempfile.mkdtemp())
            >>> model = get_peft_model(CLIPModel.from_pretrained(path), CLIPAdapterConfig())
            >>> folder = tempfile.mkdtemp()
            >>> FewShotClassifier(model, AutoProcessor.from_pretrained(path), ["cat", "dog"]).save_pretrained(folder)
            >>> FewShotClassifier.from_pretrained(folder).class_names
            ['cat', 'dog']
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the adapter, its config, the class names and templates, and the model card, in one folder.

        Args:
            save_directory: Folder to save into (created if needed).
            **kwargs: Passed to ``CLIPAdapterPeftModel.save_pretrained``.

        Returns:
            None.

        Raises:
            ValueError: if the model is not a CLIP-Adapter ``PeftModel`` (CLIP's zero-shot classifier has
                nothing to save but its class names).

        Example:
            See the class example.
        """
        self._adapted_model().save_pretrained(os.fspath(save_directory), **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload what ``save_pretrained`` writes to the Hub repository ``repo_id``, in one commit.

        Args:
            repo_id: ``"user/name"``; created if it does not exist.
            **kwargs: Passed to ``CLIPAdapterPeftModel.push_to_hub`` (``private``, ``token``, ...).

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload.

        Raises:
            ValueError: as ``save_pretrained``.

        Example:
            The upload needs the network, so the example is not run here (the tests intercept it):

            >>> classifier.push_to_hub("me/clip-adapter-eurosat")  # doctest: +SKIP
        """
        return self._adapted_model().push_to_hub(repo_id, **kwargs)

    @torch.no_grad()
    def logits(self, images: Sequence[Any]) -> torch.Tensor:
        """The logits ``[N, C]`` of the images, computed exactly as the trainer evaluates them.

        Args:
            images: Images in any form ``load_image`` reads: PIL images, file paths, encoded bytes or
                ``{"path", "bytes"}`` dicts.

        Returns:
            ``[N, C]`` float32 logits on the model's device, ``exp(logit_scale) * cos``.

        Example:
            See the class example; ``classifier.logits([image]).argmax(-1)`` is the predicted class id.
        """
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
        """Class probabilities from logits, as the model's zero-shot pipeline shows them.

        A softmax over the classes for CLIP-like models; for SigLIP one sigmoid per class,
        ``sigmoid(exp(logit_scale) * cos + logit_bias)``, as SigLIP was trained.

        Args:
            logits: ``[N, C]`` from ``logits``.

        Returns:
            ``[N, C]`` scores in ``[0, 1]``; with the softmax each row sums to 1.

        Example:
            See the class example; ``classifier.scores(classifier.logits(images))`` gives ``[N, C]``.
        """
        return torch.sigmoid(logits) if self.head.sigmoid_scores else logits.softmax(dim=-1)

    def __call__(self, images: Any, top_k: Optional[int] = None) -> list:
        """Score the images against every class; return the classes best first, per image.

        Args:
            images: One image, or a list of them, in any form ``load_image`` reads (PIL image, file path,
                encoded bytes, ``{"path", "bytes"}`` dict).
            top_k: Keep the ``top_k`` best classes per image (default: all of them).

        Returns:
            For one image, ``[{"score": float, "label": str}, ...]`` sorted by score, highest first (ties
            keep the class order); for a list, one such list per image.

        Raises:
            ValueError: for ``top_k < 1`` or an image that cannot be read (named).

        Example:
            See the class example.
        """
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
        """Move the model and the class prototypes to ``device``.

        Args:
            device: E.g. ``"cuda"`` or ``torch.device("cpu")``.

        Returns:
            ``self``.

        Example:
            See the class example; ``classifier.to("cuda")`` on a GPU machine.
        """
        self.model.to(device)
        self.head.to(device)
        return self

    def _adapted_model(self) -> CLIPAdapterPeftModel:
        if not isinstance(self.model, CLIPAdapterPeftModel):
            raise ValueError(
                f"Only a classifier around a CLIP-Adapter PeftModel can be saved, got {type(self.model).__name__}: "
                "wrap the model with peft.get_peft_model(model, CLIPAdapterConfig(...)) first."
            )
        self.model.class_prompts = {"class_names": self.class_names, "templates": self.templates}
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
