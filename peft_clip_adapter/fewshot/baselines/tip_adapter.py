"""Tip-Adapter (Zhang et al., ECCV 2022): a key-value cache of the shots beside CLIP's zero-shot head.

::

    logits = scale * f @ P.T + alpha * exp(-beta * (1 - f @ K.T)) @ one_hot(labels)

``f`` the unit test embedding, ``P`` the prototypes, ``K`` the cache keys (each shot's unit embedding averaged
over its augmented views, renormalised, as the authors' ``augment_epoch`` views). Tip-Adapter-F fine-tunes
``K`` (AdamW, lr 1e-3, eps 1e-4, batch 256, cosine over the run, 20 epochs; 100 for sets of at most
``SMALL_SET_CLASSES`` classes, as the authors' EuroSAT config), epoch ``e`` on view ``e % V``, final epoch kept.

The authors search alpha and beta on a validation (for ImageNet, the test) set. Here both come from k-fold
cross-validation on the shots (``search.stratified_folds``): each fold's shots are scored against a cache of
the other folds (fine-tuned on them, for -F) over the authors' grid, the best pooled accuracy wins. With one
shot per class nothing can be held out: ``FALLBACK`` (beta 1 is the authors' initial value everywhere; alpha 1
is at the low end of theirs, 1.17 for ImageNet and 2 for EuroSAT and DTD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.nn import functional as F

from peft_clip_adapter.fewshot.features import FeatureSet
from peft_clip_adapter.fewshot.search import DEFAULT_NUM_FOLDS, stratified_folds

#: The search grid: the authors' ``[i * (top - 0.1) / steps + 0.1 for i in range(steps)]`` with their EuroSAT
#: scales (beta up to 12, alpha up to 10) and steps (200 betas, 20 alphas).
BETA_GRID = tuple(i * (12 - 0.1) / 200 + 0.1 for i in range(200))
ALPHA_GRID = tuple(i * (10 - 0.1) / 20 + 0.1 for i in range(20))
#: ``(alpha, beta)`` with one shot per class, and the values Tip-Adapter-F trains its keys with.
FALLBACK = (1.0, 1.0)
#: Tip-Adapter-F's recipe.
FINE_TUNE_EPOCHS, SMALL_SET_EPOCHS, SMALL_SET_CLASSES = 20, 100, 10
FINE_TUNE_LEARNING_RATE, FINE_TUNE_BATCH = 1e-3, 256


@dataclass
class TipChoice:
    """The chosen ``alpha`` and ``beta``, how they were chosen, and the best pooled held-out accuracy."""

    alpha: float
    beta: float
    strategy: str
    held_out_accuracy: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"alpha": self.alpha, "beta": self.beta, "strategy": self.strategy,
                "held_out_accuracy": self.held_out_accuracy, **self.extra}  # fmt: skip


def cache_keys(train_set: FeatureSet) -> torch.Tensor:
    """``[N, D]`` unit keys: each image's unit embeddings averaged over its views, renormalised."""
    return F.normalize(F.normalize(train_set.features.float(), dim=-1).mean(dim=0), dim=-1)


def tip_logits(
    features: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    scale: float,
    *,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Tip-Adapter's ``[N, C]`` logits of raw embeddings ``[N, D]`` (formula in the module docstring)."""
    unit = F.normalize(features.float(), dim=-1)
    values = F.one_hot(labels, prototypes.shape[0]).float()  # [K, C]
    cache = torch.exp(-beta * (1.0 - unit @ keys.T)) @ values  # [N, C]
    return scale * unit @ prototypes.T + alpha * cache


def _grid_correct(
    features: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
    prototypes: torch.Tensor, scale: float,
) -> torch.Tensor:  # fmt: skip
    """Correct predictions ``[alphas, betas]`` of the held-out ``features`` over the whole grid."""
    unit = F.normalize(features.float(), dim=-1)
    clip = scale * unit @ prototypes.T  # [n, C]
    values = F.one_hot(key_labels, prototypes.shape[0]).float()
    betas, alphas = torch.tensor(BETA_GRID), torch.tensor(ALPHA_GRID)
    cache = torch.exp(-betas[:, None, None] * (1.0 - unit @ keys.T)) @ values  # [B, n, C]
    logits = clip + alphas[:, None, None, None] * cache  # [A, B, n, C]
    return (logits.argmax(dim=-1) == labels).sum(dim=-1)


def _fine_tune(
    keys: torch.Tensor, train_set: FeatureSet, rows: torch.Tensor, prototypes: torch.Tensor, scale: float,
    *, epochs: int, seed: int,
) -> torch.Tensor:  # fmt: skip
    """Tip-Adapter-F's keys after ``epochs`` on the views of ``rows`` (whose unit keys are ``keys``)."""
    keys = keys.clone().requires_grad_(True)
    labels = train_set.labels[rows]
    steps_per_epoch = math.ceil(len(rows) / FINE_TUNE_BATCH)
    optimizer = torch.optim.AdamW([keys], lr=FINE_TUNE_LEARNING_RATE, eps=1e-4)
    total, step = epochs * steps_per_epoch, 0
    alpha, beta = FALLBACK
    for epoch in range(epochs):
        view = F.normalize(train_set.features[epoch % train_set.num_views, rows].float(), dim=-1)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(rows), FINE_TUNE_BATCH):
            batch = order[start : start + FINE_TUNE_BATCH]
            logits = tip_logits(view[batch], keys, labels, prototypes, scale, alpha=alpha, beta=beta)
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            for group in optimizer.param_groups:  # cosine annealing per step, as the authors' scheduler
                group["lr"] = 0.5 * FINE_TUNE_LEARNING_RATE * (1 + math.cos(math.pi * step / total))
    return keys.detach()


def fine_tune_epochs(num_classes: int) -> int:
    """Tip-Adapter-F's epochs: 100 for small label sets (at most ``SMALL_SET_CLASSES`` classes, as EuroSAT), else 20.

    Example:
        >>> fine_tune_epochs(10), fine_tune_epochs(37)
        (100, 20)
    """
    return SMALL_SET_EPOCHS if num_classes <= SMALL_SET_CLASSES else FINE_TUNE_EPOCHS


def fit_tip_adapter(
    train_set: FeatureSet,
    train_eval: torch.Tensor,
    prototypes: torch.Tensor,
    scale: float,
    *,
    fine_tune: bool,
    seed: int = 0,
    num_folds: int = DEFAULT_NUM_FOLDS,
) -> tuple[torch.Tensor, TipChoice]:
    """Tip-Adapter's (or, with ``fine_tune``, Tip-Adapter-F's) keys over all shots and its chosen alpha and beta.

    Args:
        train_set: ``V`` cached augmented views of the ``N`` shots.
        train_eval: ``[N, D]`` eval-transform embeddings of the same shots: held-out shots are scored on these.
        num_folds: ``k``, lowered to the shots per class.
    """
    labels = train_set.labels
    shots = int(torch.unique(labels, return_counts=True)[1].min())
    epochs = fine_tune_epochs(prototypes.shape[0])
    every = torch.arange(len(labels))

    def keys_of(rows: torch.Tensor) -> torch.Tensor:
        keys = cache_keys(FeatureSet(train_set.features[:, rows], labels[rows]))
        return _fine_tune(keys, train_set, rows, prototypes, scale, epochs=epochs, seed=seed) if fine_tune else keys

    extra = {"fine_tune_epochs": epochs} if fine_tune else {}
    if shots < 2:
        strategy = f"no search: a class has {shots} shot, nothing to hold out; fell back to alpha 1, beta 1"
        return keys_of(every), TipChoice(*FALLBACK, strategy, extra=extra)
    num_folds = min(num_folds, shots)
    folds = stratified_folds(labels, num_folds, seed=seed)
    correct = torch.zeros(len(ALPHA_GRID), len(BETA_GRID), dtype=torch.long)
    for fold in range(num_folds):
        kept, held = torch.nonzero(folds != fold).flatten(), torch.nonzero(folds == fold).flatten()
        correct += _grid_correct(train_eval[held], labels[held], keys_of(kept), labels[kept], prototypes, scale)
    best = int(correct.flatten().argmax())  # the first best: smallest alpha, then smallest beta
    alpha, beta = ALPHA_GRID[best // len(BETA_GRID)], BETA_GRID[best % len(BETA_GRID)]
    strategy = f"{num_folds}-fold cross-validation on {shots} shots per class"
    choice = TipChoice(alpha, beta, strategy, correct.max().item() / len(labels), extra)
    return keys_of(every), choice
