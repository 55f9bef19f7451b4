"""CLIP-LoRA, the end-to-end few-shot baseline, through peft's own ``LoraConfig`` and ``get_peft_model``.

The recipe of Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models" (CVPRW 2024; the
defaults of github.com/MaxZanella/CLIP-LoRA, ``run_utils.py``, ``lora.py``, ``main.py``): LoRA of rank 2, alpha 1
and dropout 0.25 on the q, k and v projections of every encoder layer of both towers; AdamW (weight decay 0.01,
betas 0.9 / 0.999) at 2e-4, cosine-annealed to 1e-6 over 500 x shots iterations of batch 32, with the paper's
random-resized-crop and flip; cross-entropy on the frozen logit scale (their 100, CLIP's own) times the cosine of
each image to each class's prompt, both towers run every step; the final iterate. Here the prompts are the
normalised mean of the given templates (theirs: one template), and training runs in the model's dtype (theirs:
fp16 autocast).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import peft
import torch
from torch import nn
from torch.nn import functional as F

from peft_clip_adapter.fewshot.classifier import (
    CLIPAdapterClassifier,
    encode_class_prompts,
    model_logit_scale,
    prompt_padding,
)
from peft_clip_adapter.fewshot.data import build_eval_transform, build_train_transform, check_columns
from peft_clip_adapter.fewshot.embeddings import model_device, unwrap_model
from peft_clip_adapter.fewshot.features import dataset_labels, extract_image_features
from peft_clip_adapter.fewshot.inputs.images import load_image
from peft_clip_adapter.fewshot.inputs.transforms import (
    NaFlexTransform,
    ResizedCropTransform,
    check_index,
    move_model_inputs,
    stack_model_inputs,
)
from peft_clip_adapter.fewshot.logs import quiet_peft_wrapping
from peft_clip_adapter.fewshot.templates import as_template_list, clean_classname, fill_template

#: CLIP-LoRA's fixed settings besides the rank, the learning rate and the batch (arguments here).
LORA_ALPHA = 1
LORA_DROPOUT = 0.25
WEIGHT_DECAY = 1e-2
ADAM_BETAS = (0.9, 0.999)
FINAL_LEARNING_RATE = 1e-6
#: The recipe's length: ``iterations = ITERATIONS_PER_SHOT * shots``.
ITERATIONS_PER_SHOT = 500

# An encoder layer's self-attention projection in the vision or text transformer of CLIP, SigLIP and SigLIP 2
# (also inside another module: hence the optional prefix).
_PROJECTION = re.compile(r"(?:^|\.)(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj$")
_TOWER_OF = {"vision_model": "vision", "text_model": "text"}
# Decoded training images kept in memory, at most (a few-shot set usually fits whole): every step then only
# crops, resizes and flips, which is half a step's time on the micro-CLIP otherwise spent decoding again.
_DECODED_BYTES = 1 << 30
# The label column extraction is given for a dataset without labels: lora_logits never reads it.
_UNUSED_LABEL = "__lora_unused_label"


def attention_projections(model: nn.Module) -> dict[str, list[str]]:
    """``{"vision": names, "text": names}``: the full names of the q, k, v ``nn.Linear`` projections of each
    tower's encoder layers, in module order (empty lists for a tower without them)."""
    found: dict[str, list[str]] = {"vision": [], "text": []}
    for name, module in unwrap_model(model).named_modules():
        match = _PROJECTION.search(name)
        if match and isinstance(module, nn.Linear):
            found[_TOWER_OF[match.group(1)]].append(name)
    return found


def lora_config_for(model: nn.Module, *, rank: int = 2) -> peft.LoraConfig:
    """CLIP-LoRA's config: LoRA on both towers' attention projections (q, k, v) of a CLIP / SigLIP / SigLIP 2 model.

    ``target_modules`` lists the projections by full name, so nothing else of the model (SigLIP's pooling head)
    is touched. Raises ``ValueError`` for ``rank < 1``, or naming the model class and the tower whose
    projections it lacks.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be an integer >= 1 (CLIP-LoRA uses 2).")
    projections = attention_projections(model)
    missing = [tower for tower, names in projections.items() if not names]
    if missing:
        where = f"its {missing[0]} tower" if len(missing) == 1 else "either tower"
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} has no attention projections for LoRA in {where}: CLIP-LoRA "
            "adapts the q_proj, k_proj and v_proj Linear layers of every encoder layer of both towers of a dual "
            "encoder ('vision_model.encoder.layers.N.self_attn.q_proj', 'text_model.encoder.layers.N.self_attn...'), "
            "as CLIP, SigLIP and SigLIP 2 have them. Use a dual encoder of one of those families."
        )
    return peft.LoraConfig(
        r=rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        bias="none",
        target_modules=projections["vision"] + projections["text"],
    )


def _check_settings(seed: int, iterations: int, batch_size: int, learning_rate: float) -> None:
    """``ValueError`` naming a bad seed, count (< 1) or learning rate (<= 0)."""
    check_index("seed", seed)
    for name, value in (("iterations", iterations), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0 (CLIP-LoRA uses 2e-4).")


def _training_labels(
    train_dataset: datasets.Dataset, class_names: list[str], image_column: str, label_column: str
) -> torch.Tensor:
    """The labels ``[N]``, after checking the columns, that there are rows and that every label has a name."""
    check_columns(train_dataset, image_column, label_column)
    if len(train_dataset) == 0:
        raise ValueError("train_dataset has no rows; LoRA needs at least one labelled image.")
    labels = dataset_labels(train_dataset, label_column)  # [N]
    if int(labels.max()) >= len(class_names):
        raise ValueError(
            f"train_dataset has label {int(labels.max())} but class_names holds {len(class_names)} names "
            f"(labels 0 to {len(class_names) - 1}); pass one name per class, in label order."
        )
    return labels


def _epoch_batches(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless ``(epoch, rows)``: a fresh shuffle each epoch, the last incomplete batch dropped (as the reference
    loader), and a set smaller than a batch taken whole."""
    size = min(batch_size, num_rows)
    epoch = 0
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - size + 1, size):
            yield epoch, order[start : start + size]
        epoch += 1


class _TrainViews:
    """The model's inputs for view ``view`` of training rows, equal to the train transform's, from images decoded
    once (up to ``_DECODED_BYTES``; the rest are decoded again each time)."""

    def __init__(self, dataset: datasets.Dataset, image_column: str, transform: Any) -> None:
        images = dataset.select_columns([image_column])
        if isinstance(images.features[image_column], datasets.Image):
            # Undecoded, so that the transform decodes each file itself (a large JPEG at reduced scale).
            images = images.cast_column(image_column, datasets.Image(decode=False))
        self.images, self.image_column, self.transform = images, image_column, transform
        self.decoded: dict[int, Any] = {}
        self.decoded_bytes = 0

    def _decode(self, value: Any) -> Any:
        """What the transform is called on: its own decoding for a fixed size, the RGB image for NaFlex."""
        if isinstance(self.transform, ResizedCropTransform):
            return self.transform.decode(value)
        return load_image(value) if isinstance(self.transform, NaFlexTransform) else value

    def _images(self, rows: list[int]) -> list[Any]:
        missing = [row for row in rows if row not in self.decoded]
        fetched = dict(zip(missing, self.images[missing][self.image_column], strict=True)) if missing else {}
        images = []
        for row in rows:
            image = self.decoded.get(row)
            if image is None:
                image = self._decode(fetched[row])
                picture = getattr(image, "image", image)  # a fixed-size transform's DecodedImage holds it
                size = picture.width * picture.height * 3 if hasattr(picture, "width") else _DECODED_BYTES + 1
                if self.decoded_bytes + size <= _DECODED_BYTES:
                    self.decoded[row], self.decoded_bytes = image, self.decoded_bytes + size
            images.append(image)
        return images

    def __call__(self, rows: list[int], view: int) -> dict[str, torch.Tensor]:
        images = self._images(rows)
        transform = self.transform
        if not isinstance(transform, ResizedCropTransform):
            return stack_model_inputs(
                [transform(image, index=row, view=view) for row, image in zip(rows, images, strict=True)]
            )
        crops = [
            np.asarray(transform.render(image, transform.view_boxes(image, index=row, views=[view])[0]))
            for row, image in zip(rows, images, strict=True)
        ]  # [H, W, 3] uint8 each
        pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)  # [B, 3, H, W]
        return {"pixel_values": transform.normalise(pixels)}  # as the transform, a batch at once


def _pooled(output: Any) -> torch.Tensor:
    """The embedding a ``get_*_features`` call returns (a tensor, or a ModelOutput holding it in ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _prompt_tokens(model: nn.Module, processor: Any, class_names: list[str], templates: list[Any]) -> dict:
    """Token ids (and mask) of every class x template prompt, class-major, padded as the model was trained."""
    prompts = [fill_template(template, clean_classname(name)) for name in class_names for template in templates]
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = tokenizer(prompts, return_tensors="pt", **prompt_padding(model, processor))
    device = model_device(unwrap_model(model))
    return {name: tokens[name].to(device) for name in ("input_ids", "attention_mask") if name in tokens}


def train_lora(
    model: nn.Module,
    processor: Any,
    train_dataset: datasets.Dataset,
    class_names: list[str],
    templates: list[str],
    *,
    seed: int,
    iterations: int,
    batch_size: int = 32,
    learning_rate: float = 2e-4,
    image_column: str = "image",
    label_column: str = "label",
) -> peft.PeftModel:
    """Train CLIP-LoRA end to end on ``train_dataset``; returns the ``PeftModel`` (the final iterate) in eval mode.

    Every iteration runs a batch of augmented images (``build_train_transform(processor, seed=seed)``, view ``e``
    in epoch ``e``) through the vision tower and every class prompt through the text tower, both with their LoRA
    weights. ``model`` (a transformers CLIP / SigLIP / SigLIP 2 model, not yet wrapped) receives the LoRA layers
    in place. The LoRA initialisation, dropout and batch order depend on ``seed`` alone: the same seed gives the
    same weights. The recipe's length is ``iterations = ITERATIONS_PER_SHOT * shots``; pass fewer to fit a budget.

    Raises ``ValueError`` for a bad seed, ``iterations`` or ``batch_size`` < 1, ``learning_rate <= 0``, a missing
    column, no rows, a label without a class name, or a model without the projections (``lora_config_for``).
    """
    templates = as_template_list(templates)
    _check_settings(seed, iterations, batch_size, learning_rate)
    labels = _training_labels(train_dataset, class_names, image_column, label_column)
    config = lora_config_for(model)
    device = model_device(model)
    tokens = _prompt_tokens(model, processor, class_names, templates)
    views = _TrainViews(train_dataset, image_column, build_train_transform(processor, seed=seed))
    scale = model_logit_scale(model).detach().float().exp()  # frozen, as the reference's fixed 100
    labels = labels.to(device)
    # LoRA's initialisation and dropout draw from the global generator: seed a private copy of it.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with quiet_peft_wrapping():
            peft_model = peft.get_peft_model(model, config)
        parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations, eta_min=FINAL_LEARNING_RATE)
        batches = _epoch_batches(len(train_dataset), batch_size, torch.Generator().manual_seed(seed))
        dtype = next(parameter.dtype for parameter in model.parameters() if parameter.is_floating_point())
        peft_model.train()
        for _ in range(iterations):
            epoch, rows = next(batches)
            inputs = move_model_inputs(views(rows.tolist(), epoch), device, dtype)
            images = F.normalize(_pooled(peft_model.get_image_features(**inputs)).float(), dim=-1)  # [B, D]
            text = _pooled(peft_model.get_text_features(**tokens)).float()  # [C*T, D]
            prompts = F.normalize(text.reshape(len(class_names), len(templates), -1), dim=-1)  # [C, T, D]
            prototypes = F.normalize(prompts.mean(dim=1), dim=-1)  # [C, D]
            loss = F.cross_entropy(scale * images @ prototypes.T, labels[rows.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return peft_model.eval()


def lora_logits(
    peft_model: nn.Module,
    processor: Any,
    dataset: datasets.Dataset,
    class_names: list[str],
    templates: list[str],
    *,
    image_column: str = "image",
    batch_size: int = 64,
) -> torch.Tensor:
    """[N, C] logits of the dataset's images against the class prompts, both towers with their LoRA weights
    (so unseen class names work: base-to-novel).

    ``logit_scale * normalize(image) @ prototypes + logit_bias`` (SigLIP's bias, else 0) on the CPU in float32,
    with the eval transform and the prototypes of ``encode_class_prompts``. Raises ``ValueError`` as those and
    ``extract_image_features`` do (no class names, duplicates, a missing image column, no rows).
    """
    # encode_class_prompts and the extraction switch CLIP-Adapter layers off, never LoRA: these see its weights.
    class_embeddings = encode_class_prompts(peft_model, processor, class_names, templates)  # [C, T, D]
    if image_column not in dataset.column_names:
        check_columns(dataset, image_column, image_column)  # the error naming the columns there are
    images = dataset.select_columns([image_column])
    images = images.add_column(_UNUSED_LABEL, [0] * len(images))  # extraction wants labels; these are unread
    features = extract_image_features(
        peft_model,
        images,
        build_eval_transform(processor),
        image_column=image_column,
        label_column=_UNUSED_LABEL,
        batch_size=batch_size,
    )
    head = CLIPAdapterClassifier.from_model(peft_model, class_embeddings)
    with torch.no_grad():
        return head(features.features[0].to(class_embeddings.device)).cpu()  # [N, C]
