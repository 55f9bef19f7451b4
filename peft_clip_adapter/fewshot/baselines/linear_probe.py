"""ZS-LP: a linear head initialised from the text prototypes and trained on the cached features, without validation.

The idea is CLAP's (Silva-Rodriguez et al., CVPR 2024): start from the zero-shot classifier, so that before
any step the probe IS zero-shot CLIP, and train with one fixed setting instead of a search. The recipe here:
logits ``scale * normalize(f) @ W.T`` with ``W`` ``[C, D]`` initialised to the unit prototypes (not
renormalised while training), cross-entropy over every cached view of every shot in one full batch, Adam at
``LEARNING_RATE`` for ``STEPS`` steps, the final weights kept.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from peft_clip_adapter.fewshot.baselines.zero_shot import zero_shot_logits
from peft_clip_adapter.fewshot.features import FeatureSet

#: Adam's rate and the number of full-batch steps of the fixed recipe.
LEARNING_RATE = 1e-3
STEPS = 300


def train_linear_probe(
    train_set: FeatureSet, prototypes: torch.Tensor, scale: float, *, steps: int = STEPS, seed: int = 0
) -> torch.Tensor:
    """The trained head ``W`` ``[C, D]``, from ``prototypes`` ``[C, D]`` over all views of ``train_set``.

    Raises ``ValueError`` for ``steps < 0`` or a label outside the prototypes' classes.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (full-batch Adam steps), got {steps}.")
    if int(train_set.labels.max()) >= prototypes.shape[0]:
        raise ValueError(
            f"Training labels reach {int(train_set.labels.max())} but there are {prototypes.shape[0]} prototypes."
        )
    torch.manual_seed(seed)  # full-batch Adam draws nothing; seeded all the same for any later change
    features, labels = train_set.flatten()  # [V*N, D], [V*N]
    features = F.normalize(features.float(), dim=-1)
    weight = prototypes.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=LEARNING_RATE)
    for _ in range(steps):
        loss = F.cross_entropy(scale * features @ weight.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach()


def linear_probe_logits(features: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N, C]`` logits of raw embeddings ``[N, D]`` under the probe ``weight`` ``[C, D]``."""
    return zero_shot_logits(features, weight, scale)
