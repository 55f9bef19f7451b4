"""A micro-CLIP pretrained contrastively on generated captioned scenes, for offline demonstrations and tests.

``tiny_models.build_tiny_clip`` is randomly initialised, so its zero-shot accuracy is chance.
``build_micro_clip`` pretrains that small architecture as CLIP was pretrained (symmetric contrastive loss
over image-caption pairs) on ``testing.scenes``, with a few (shape, colour) pairs never shown: a real, small
vision-language model whose zero-shot is well above chance and which CLIP-Adapter improves
(``testing.scene_tasks``). It is built, not shipped: deterministic (fixed seed and CPU thread count) and about
a minute on two cores, so the weights are reproducible from this file and follow transformers' format::

    path = build_micro_clip("micro-clip")
    model, processor = CLIPModel.from_pretrained(path), AutoProcessor.from_pretrained(path)
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from peft_clip_adapter.testing.scenes import caption_scenes, render_scenes, sample_scenes, vocabulary
from peft_clip_adapter.testing.tiny_models import build_tiny_clip

#: (shape, colour) pairs that pretraining never shows: one per shape and one per colour.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "red"),
    ("cross", "purple"),
    ("diamond", "orange"),
    ("ring", "green"),
)
#: Written beside the weights: the settings and the final loss of the pretraining run.
PRETRAINING_FILE = "pretraining.json"


@dataclass(frozen=True)
class PretrainingConfig:
    """Size and schedule of the micro-CLIP's pretraining.

    Raises ``ValueError`` for a count below 1, a batch of one, a pool smaller than a batch, or a rate <= 0.
    """

    steps: int = 500
    batch_size: int = 256  # image-caption pairs per step: the contrastive loss's negatives
    # Captioned scenes rendered and tokenized up front (cheaper than per step), gone through in shuffled passes;
    # a short run renders no more than it uses.
    pool_size: int = 32768
    learning_rate: float = 3e-3  # AdamW's peak, after a linear warm-up, then a cosine decay
    warmup_steps: int = 30
    weight_decay: float = 0.05  # not applied to the logit scale
    # The temperature learns this much faster, to grow towards CLIP's clamp of 100 within a short run.
    logit_scale_lr_multiplier: float = 10.0
    image_size: int = 32
    hidden_size: int = 64  # both transformer towers
    projection_dim: int = 64  # the joint embedding space: what CLIP-Adapter adapts
    seed: int = 0  # the initial weights and every scene
    # Fixed: another thread count may sum matrix products in another order, so weights reproduce for one value.
    num_threads: int = 1

    def __post_init__(self) -> None:
        counts = (self.steps, self.warmup_steps, self.num_threads)
        if min(counts) < 1 or self.batch_size < 2 or self.pool_size < self.batch_size or self.learning_rate <= 0:
            raise ValueError(
                "PretrainingConfig needs steps, warmup_steps and num_threads >= 1, batch_size >= 2, pool_size >= "
                f"batch_size and learning_rate > 0, got {self}."
            )


def build_micro_clip(save_directory: str | os.PathLike, config: PretrainingConfig = PretrainingConfig()) -> str:
    """Pretrain a micro-CLIP and save it with its processor to ``save_directory``; returns ``str(save_directory)``.

    The folder loads like a Hub checkpoint and also holds ``pretraining.json``: the config, the final loss and
    logit scale, and the run's wall time.
    """
    from transformers import AutoProcessor, CLIPModel

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        build_tiny_clip(
            save_directory,
            words=vocabulary(),
            projection_dim=config.projection_dim,
            hidden_size=config.hidden_size,
            image_size=config.image_size,
            seed=config.seed,
        )
        model = CLIPModel.from_pretrained(save_directory)
        processor = AutoProcessor.from_pretrained(save_directory)
        history = _pretrain(model, processor, config)
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(save_directory)
    report = {
        "config": asdict(config),
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        **history,
        "seconds": time.perf_counter() - start,
    }
    (Path(save_directory) / PRETRAINING_FILE).write_text(json.dumps(report, indent=2))
    return str(save_directory)


def _pretrain(model, processor, config: PretrainingConfig) -> dict[str, Any]:
    """CLIP's objective: symmetric cross-entropy over the batch's image-caption similarities."""
    generator = torch.Generator().manual_seed(config.seed)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None] * 255
    std = torch.tensor(processor.image_processor.image_std)[:, None, None] * 255
    pool = min(config.pool_size, config.steps * config.batch_size)
    scenes = sample_scenes(pool, generator, exclude_pairs=HELD_OUT_PAIRS)
    images = render_scenes(scenes, generator, image_size=config.image_size)  # [P, 3, H, W] uint8
    tokens = processor.tokenizer(caption_scenes(scenes, generator), padding=True, return_tensors="pt")
    weights = [parameter for name, parameter in model.named_parameters() if name != "logit_scale"]
    optimizer = torch.optim.AdamW(
        [
            {"params": weights, "weight_decay": config.weight_decay, "multiplier": 1.0},
            {"params": [model.logit_scale], "weight_decay": 0.0, "multiplier": config.logit_scale_lr_multiplier},
        ],
        lr=config.learning_rate,
    )
    targets = torch.arange(config.batch_size)
    batches_per_pass = pool // config.batch_size
    model.train()
    losses = []
    for step in range(config.steps):
        warmup = min(1.0, (step + 1) / config.warmup_steps)
        rate = config.learning_rate * warmup * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = rate * group["multiplier"]
        if step % batches_per_pass == 0:
            order = torch.randperm(pool, generator=generator)
        rows = order[(step % batches_per_pass) * config.batch_size :][: config.batch_size]
        pixels = (images[rows].float() - mean) / std  # [B, 3, H, W]
        batch = {name: values[rows] for name, values in tokens.items()}
        logits = model(pixel_values=pixels, **batch).logits_per_image  # [B, B], images x captions
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))  # CLIP's clamp
        losses.append(loss.item())
    tail = losses[-20:]
    return {"final_loss": sum(tail) / len(tail), "logit_scale": model.logit_scale.exp().item()}
