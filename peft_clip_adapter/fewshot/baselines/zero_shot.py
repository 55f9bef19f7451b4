"""CLIP's zero-shot head: class prototypes from the prompts, and cosine logits against them."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def text_prototypes(class_embeddings: torch.Tensor) -> torch.Tensor:
    """Unit prototypes ``[C, D]`` from prompt embeddings ``[C, T, D]``: normalise, average templates, renormalise."""
    return F.normalize(F.normalize(class_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def zero_shot_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * normalize(features) @ prototypes.T``: ``[N, D]`` raw embeddings against ``[C, D]`` -> ``[N, C]``."""
    return scale * F.normalize(features.float(), dim=-1) @ prototypes.T
