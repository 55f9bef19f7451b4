"""Choose the residual ratio (and learning rate) from the training shots alone, by k-fold cross-validation.

Picked with the test set in view, the ratio flatters the adapter; picked badly, it falls below zero-shot
(Silva-Rodriguez et al., CVPR 2024). Here every (candidate, fold) trains on the other folds with the
trainer's recipe and is scored on its fold; the best pooled held-out accuracy wins (ties: lower loss, then
grid order). The adapters are tiny and the features cached, so all ``candidates x folds`` adapters train as
ONE batched model (weights ``[M, d/r, d]`` and ``[M, d, d/r]``); ``benchmarks/search_cost.py`` measures the
cost. With one shot per class nothing can be held out and the paper's values are used::

    result = search_hyperparameters(head, train_set, eval_view, ratios=(0.2, 0.4, 0.6, 0.8))
    set_ratio(model, result.ratio)  # then train on all shots with result.learning_rate
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier
from peft_clip_adapter.fewshot.features import FeatureSet
from peft_clip_adapter.fewshot.recipe import TrainingRecipe
from peft_clip_adapter.model import adapter_layers

#: Candidate ratios of ``--ratio auto``: the paper's 0.2 (generic datasets) and 0.6 (far from CLIP's data),
#: and the steps between and beyond them.
DEFAULT_RATIO_GRID: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
#: Candidate peak learning rates of ``--learning_rate auto``: the paper's 2e-3, a quarter of it and four times it.
DEFAULT_LEARNING_RATE_GRID: tuple[float, ...] = (5e-4, 2e-3, 8e-3)
#: Folds of the cross-validation (at most the shots per class).
DEFAULT_NUM_FOLDS = 4

_FOLD_STREAM = 0x5EA4C4  # keeps the fold draw independent of the k-shot sample drawn with the same seed


@dataclass
class SearchResult:
    """What a hyperparameter search tried, how each candidate scored, and what it chose.

    ``strategy`` says how the choice was made (a k-fold search, or the fallback and why); ``num_folds`` is 0 for
    the fallback. ``candidates`` holds one entry per (ratio, learning rate): ``validation_accuracy`` (pooled over
    the folds), ``validation_loss`` and ``fold_accuracy``.
    """

    ratio: float
    learning_rate: float
    strategy: str
    num_folds: int
    ratio_grid: list[float] = field(default_factory=list)
    learning_rate_grid: list[float] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (for ``all_results.json``), plus ``"summary"``."""
        return {**asdict(self), "summary": self.summary()}

    def summary(self) -> str:
        """One line for logs and model cards: each candidate's held-out accuracy and the choice.

        Example:
            >>> SearchResult(0.2, 2e-3, "the paper's values (1 shot per class)", 0).summary()
            "the paper's values (1 shot per class): ratio 0.2, learning rate 0.002"
        """
        chosen = f"ratio {self.ratio:g}, learning rate {self.learning_rate:g}"
        if not self.candidates:
            return f"{self.strategy}: {chosen}"
        scores = ", ".join(
            f"{_candidate_name(c, self.ratio_grid, self.learning_rate_grid)} {c['validation_accuracy']:.3f}"
            for c in self.candidates
        )
        return f"{self.strategy}: {scores}; chose {chosen}"


def _candidate_name(candidate: dict[str, Any], ratios: Sequence[float], learning_rates: Sequence[float]) -> str:
    parts = []
    if len(ratios) > 1:
        parts.append(f"ratio {candidate['ratio']:g}")
    if len(learning_rates) > 1:
        parts.append(f"lr {candidate['learning_rate']:g}")
    return " ".join(parts)


def stratified_folds(labels: torch.Tensor, num_folds: int, *, seed: int = 0) -> torch.Tensor:
    """Fold ids ``[N]`` in ``[0, num_folds)``: each class shuffled by ``(seed, class)`` and dealt out in turn.

    Every fold holds ``floor`` or ``ceil`` of ``count / num_folds`` images of each class. Raises ``ValueError`` if
    ``num_folds < 2`` or a class has fewer images than folds.
    """
    classes, counts = torch.unique(labels, return_counts=True)
    if num_folds < 2 or num_folds > int(counts.min()):
        raise ValueError(
            f"num_folds={num_folds} must be in [2, {int(counts.min())}] (the smallest class has "
            f"{int(counts.min())} images)."
        )
    folds = torch.empty_like(labels)
    for label in classes.tolist():
        members = torch.nonzero(labels == label).flatten().numpy()
        shuffled = np.random.default_rng([seed, label, _FOLD_STREAM]).permutation(members)
        folds[torch.from_numpy(shuffled)] = torch.arange(len(shuffled)) % num_folds
    return folds


class BatchedAdapterHeads(nn.Module):
    """``M`` independent CLIP-Adapter heads evaluated at once, each with its own ratio and adapter weights.

    Member ``m`` computes what ``CLIPAdapterClassifier`` does with ratio ``ratios[m]``; weights are stacked
    ``[M, d/r, D]`` (down) and ``[M, D, d/r]`` (up) per branch and applied with batched matrix products.
    ``vision_init`` / ``text_init`` are the ``(down [d/r, D], up [D, d/r])`` every member starts from, ``None``
    for no such adapter. Raises ``ValueError`` with neither, or weights whose width is not ``D``.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        ratios: Sequence[float],
        *,
        vision_init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        text_init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> None:
        super().__init__()
        if vision_init is None and text_init is None:
            raise ValueError("BatchedAdapterHeads needs vision_init, text_init or both: nothing would train.")
        width = class_embeddings.shape[-1]
        members = len(ratios)
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())  # [C, T, D]
        scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=class_embeddings.device)
        self.register_buffer("logit_scale", scale.detach().clone())
        self.register_buffer("ratios", torch.tensor(list(ratios), dtype=torch.float32, device=class_embeddings.device))
        self.branches = nn.ParameterDict()
        for branch, init in (("vision", vision_init), ("text", text_init)):
            if init is None:
                continue
            down, up = (weight.detach().float().to(class_embeddings.device) for weight in init)
            if down.shape[1] != width or up.shape[0] != width or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"{branch}_init must be (down [h, {width}], up [{width}, h]), got shapes "
                    f"{tuple(down.shape)} and {tuple(up.shape)}."
                )
            self.branches[f"{branch}_down"] = nn.Parameter(down.expand(members, -1, -1).clone())  # [M, h, D]
            self.branches[f"{branch}_up"] = nn.Parameter(up.expand(members, -1, -1).clone())  # [M, D, h]

    @property
    def num_members(self) -> int:
        """``M``, the number of heads."""
        return self.ratios.shape[0]

    def _adapt(self, branch: str, features: torch.Tensor) -> torch.Tensor:
        """``ratio * ReLU(up(ReLU(down(f)))) + (1 - ratio) * f`` per member: ``[M, B, D] -> [M, B, D]``."""
        if f"{branch}_down" not in self.branches:
            return features
        down, up = self.branches[f"{branch}_down"], self.branches[f"{branch}_up"]
        hidden = F.relu(torch.bmm(features, down.transpose(1, 2)))  # [M, B, h]
        residual = F.relu(torch.bmm(hidden, up.transpose(1, 2)))  # [M, B, D]
        ratio = self.ratios[:, None, None]
        return ratio * residual + (1.0 - ratio) * features

    def text_weights(self) -> torch.Tensor:
        """Each member's class prototypes ``[M, C, D]`` (unit rows), as ``CLIPAdapterClassifier.text_weights``."""
        classes, templates, width = self.class_embeddings.shape
        prompts = self.class_embeddings.reshape(1, classes * templates, width).expand(self.num_members, -1, -1)
        prompts = self._adapt("text", prompts).reshape(self.num_members, classes, templates, width)
        prototypes = F.normalize(prompts, dim=-1).mean(dim=2)  # [M, C, D]
        return F.normalize(prototypes, dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, B, C]`` from raw pooled embeddings ``[M, B, D]`` (member ``m`` sees row ``m``)."""
        features = F.normalize(self._adapt("vision", image_features.float()), dim=-1)  # [M, B, D]
        return self.logit_scale.exp() * torch.bmm(features, self.text_weights().transpose(1, 2))  # [M, B, C]

    def adapter_weights(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s weights, detached: ``{"vision_down": [h, D], "vision_up": [D, h], ...}``."""
        return {name: weight[member].detach().clone() for name, weight in self.branches.items()}


def train_batched(
    heads: BatchedAdapterHeads,
    train_features: FeatureSet,
    member_rows: Sequence[torch.Tensor],
    learning_rates: Sequence[float],
    recipe: TrainingRecipe,
) -> torch.Tensor:
    """Train member ``m`` of ``heads`` on rows ``member_rows[m]`` of ``train_features``, all members in one loop.

    Each member follows the trainer's recipe as if alone: epoch ``e`` uses view ``e % V`` and shuffles with seed
    ``recipe.seed + e`` (as Accelerate's seedable sampler), global batches of ``recipe.batch_size`` (the last
    incomplete one dropped), cross-entropy, SGD with momentum and weight decay, the schedule peaking at
    ``learning_rates[m]``. Members with fewer steps per epoch sit the extra steps out. Returns ``[M, epochs]``
    mean training losses. Raises ``ValueError`` if the counts disagree or a member has no rows.
    """
    members = heads.num_members
    if not len(member_rows) == len(learning_rates) == members:
        raise ValueError(
            f"Got {len(member_rows)} row sets and {len(learning_rates)} learning rates for {members} members; "
            "pass one of each per member."
        )
    counts = [len(rows) for rows in member_rows]
    if min(counts) < 1:
        raise ValueError("Every member needs at least one training row.")
    device = heads.ratios.device
    labels = train_features.labels.to(device)
    steps = [recipe.steps_per_epoch(count) for count in counts]
    batch = [min(recipe.batch_size, count) for count in counts]
    widest, longest = max(batch), max(steps)
    parameters = list(heads.parameters())
    momentum_buffers: list[Optional[torch.Tensor]] = [None] * len(parameters)
    completed = [0] * members
    losses = torch.zeros(members, recipe.num_train_epochs)

    for epoch in range(recipe.num_train_epochs):
        features = train_features.features[epoch % train_features.num_views].to(device)  # [N, D]
        orders: dict[int, torch.Tensor] = {}  # members with as many rows share the epoch's shuffle
        shuffled = []
        for rows, count in zip(member_rows, counts, strict=True):
            if count not in orders:
                orders[count] = torch.randperm(count, generator=torch.Generator().manual_seed(recipe.seed + epoch))
            shuffled.append(rows[orders[count]])
        for step in range(longest):
            index = torch.zeros(members, widest, dtype=torch.long)
            weight = torch.zeros(members, widest)  # 1/batch on a member's rows, 0 on padding
            active = torch.zeros(members, dtype=torch.bool)
            for member in range(members):
                if step < steps[member]:
                    chunk = shuffled[member][step * batch[member] : (step + 1) * batch[member]]
                    index[member, : len(chunk)] = chunk
                    weight[member, : len(chunk)] = 1.0 / len(chunk)
                    active[member] = True
            index, weight, active = index.to(device), weight.to(device), active.to(device)
            logits = heads(features[index])  # [M, B, C]
            per_row = F.cross_entropy(logits.flatten(0, 1), labels[index].flatten(), reduction="none")  # [M*B]
            member_loss = (per_row.view(members, widest) * weight).sum(dim=1)  # [M], each a batch mean
            gradients = torch.autograd.grad(member_loss.sum(), parameters)
            rates = [
                recipe.learning_rate_at(completed[member], learning_rates[member], num_images=counts[member])
                if active[member]
                else 0.0
                for member in range(members)
            ]
            _sgd_step(parameters, gradients, momentum_buffers, torch.tensor(rates, device=device), active, recipe)
            losses[:, epoch] += member_loss.detach().cpu() * active.cpu()
            for member in range(members):
                completed[member] += int(active[member])
    return losses / torch.tensor(steps, dtype=torch.float32)[:, None]


@torch.no_grad()
def _sgd_step(
    parameters: list[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    buffers: list[Optional[torch.Tensor]],
    rates: torch.Tensor,
    active: torch.Tensor,
    recipe: TrainingRecipe,
) -> None:
    """``torch.optim.SGD``'s update (momentum, weight decay, no dampening or Nesterov), one rate per member.

    Inactive members keep their weights and momentum untouched, as if this step had not happened to them.
    """
    for position, (parameter, gradient) in enumerate(zip(parameters, gradients, strict=True)):
        shape = (-1,) + (1,) * (parameter.dim() - 1)  # broadcast [M] over a member's weight
        update = gradient + recipe.weight_decay * parameter
        if buffers[position] is None:  # the first step: every member takes part in it
            buffers[position] = update.clone()
        else:
            momentum = recipe.momentum * buffers[position] + update
            buffers[position] = torch.where(active.view(shape), momentum, buffers[position])
        parameter -= rates.view(shape) * buffers[position]


@torch.no_grad()
def _held_out_scores(
    heads: BatchedAdapterHeads, eval_features: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: correct predictions and summed cross-entropy over its held-out rows (``held_out [M, N]``)."""
    logits = heads(eval_features[None].expand(heads.num_members, -1, -1))  # [M, N, C]
    targets = labels[None].expand(heads.num_members, -1)  # [M, N]
    correct = (logits.argmax(dim=-1) == targets) & held_out
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * held_out  # [M, N]
    return correct.sum(dim=1), losses.sum(dim=1)


def search_hyperparameters(
    classifier: CLIPAdapterClassifier,
    train_features: FeatureSet,
    eval_features: torch.Tensor,
    *,
    ratios: Sequence[float] = DEFAULT_RATIO_GRID,
    learning_rates: Sequence[float] = (2e-3,),
    recipe: Optional[TrainingRecipe] = None,
    num_folds: int = DEFAULT_NUM_FOLDS,
    fallback: tuple[float, float] = (0.2, 2e-3),
) -> SearchResult:
    """The ratio and peak learning rate with the best k-fold cross-validated accuracy on the shots.

    Every candidate of ``ratios x learning_rates`` trains from the classifier's current adapter weights on each
    fold's complement (``train_batched``), then is scored on the fold; the classifier is not changed.

    Args:
        classifier: The head whose adapters, prompts and logit scale are searched.
        train_features: ``V`` cached augmented views of the ``N`` training images.
        eval_features: ``[N, D]`` eval-transform embeddings of the same images, in the same order.
        recipe: The trainer's recipe; default: the paper's.
        num_folds: ``k``; lowered to the shots per class when fewer.
        fallback: ``(ratio, learning_rate)`` when a class has a single shot; a grid of one value is that value.

    Raises ``ValueError`` for an empty grid, a ratio outside ``[0, 1]``, a learning rate <= 0, ``num_folds < 2``,
    a classifier without adapters, or ``eval_features`` that do not match the training images.
    """
    start = time.perf_counter()
    recipe = recipe or TrainingRecipe()
    ratios, learning_rates = [float(r) for r in ratios], [float(lr) for lr in learning_rates]
    _check_grid(ratios, learning_rates, num_folds)
    if classifier.vision_adapter is None and classifier.text_adapter is None:
        raise ValueError(
            "The classifier has no adapter to search for; build it from a model with CLIP-Adapter layers."
        )
    if eval_features.shape != (train_features.num_images, train_features.dim):
        raise ValueError(
            f"eval_features must be [{train_features.num_images}, {train_features.dim}] (one embedding per "
            f"training image, same order), got shape {tuple(eval_features.shape)}."
        )
    labels = train_features.labels
    shots = int(torch.unique(labels, return_counts=True)[1].min())
    grids = {"ratio_grid": ratios, "learning_rate_grid": learning_rates}
    if shots < 2:
        ratio = ratios[0] if len(ratios) == 1 else fallback[0]
        learning_rate = learning_rates[0] if len(learning_rates) == 1 else fallback[1]
        strategy = f"no search: a class has {shots} shot, nothing to hold out; fell back to the paper's values"
        return SearchResult(ratio, learning_rate, strategy, 0, **grids, seconds=time.perf_counter() - start)

    num_folds = min(num_folds, shots)
    folds = stratified_folds(labels, num_folds, seed=recipe.seed)
    grid = list(itertools.product(ratios, learning_rates))  # candidate c is member c * k + fold
    members = [(candidate, fold) for candidate in range(len(grid)) for fold in range(num_folds)]
    device = classifier.class_embeddings.device
    heads = BatchedAdapterHeads(
        classifier.class_embeddings,
        classifier.logit_scale,
        [grid[candidate][0] for candidate, _ in members],
        vision_init=_initial_weights(classifier.vision_adapter),
        text_init=_initial_weights(classifier.text_adapter),
    ).to(device)
    rows = [torch.nonzero(folds != fold).flatten() for _, fold in members]
    train_batched(heads, train_features, rows, [grid[candidate][1] for candidate, _ in members], recipe)

    held_out = torch.stack([folds == fold for _, fold in members]).to(device)  # [M, N]
    correct, loss = _held_out_scores(heads, eval_features.to(device).float(), labels.to(device), held_out)
    fold_sizes = held_out.sum(dim=1).cpu()
    candidates = []
    for index, (ratio, learning_rate) in enumerate(grid):
        span = slice(index * num_folds, (index + 1) * num_folds)
        candidates.append(
            {
                "ratio": ratio,
                "learning_rate": learning_rate,
                # Pooled over the folds: every training image is held out exactly once.
                "validation_accuracy": correct[span].sum().item() / len(labels),
                "validation_loss": loss[span].sum().item() / len(labels),
                "fold_accuracy": (correct[span].cpu() / fold_sizes[span]).tolist(),
            }
        )
    best = min(
        range(len(grid)),
        key=lambda i: (-candidates[i]["validation_accuracy"], candidates[i]["validation_loss"], i),
    )
    strategy = f"{num_folds}-fold cross-validation on {shots} shots per class"
    return SearchResult(
        candidates[best]["ratio"],
        candidates[best]["learning_rate"],
        strategy,
        num_folds,
        **grids,
        candidates=candidates,
        seconds=time.perf_counter() - start,
    )


def _check_grid(ratios: list[float], learning_rates: list[float], num_folds: int) -> None:
    if not ratios or not learning_rates:
        raise ValueError(f"The grids must not be empty, got ratios={ratios} and learning_rates={learning_rates}.")
    if any(not 0.0 <= ratio <= 1.0 for ratio in ratios):
        raise ValueError(f"Every candidate ratio must be in [0, 1], got {ratios}.")
    if any(not learning_rate > 0 for learning_rate in learning_rates):
        raise ValueError(f"Every candidate learning rate must be > 0, got {learning_rates}.")
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2 (one fold is held out, the rest train), got {num_folds}.")


def _initial_weights(layer) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The active adapter's ``(down, up)`` weights of a ``CLIPAdapterLayer``, or ``None`` without a layer."""
    if layer is None:
        return None
    name = layer.active_adapters[0]
    return layer.clip_adapter_down[name].weight, layer.clip_adapter_up[name].weight


def set_ratio(model: nn.Module, ratio: float) -> None:
    """Set the ratio of a model's active CLIP-Adapter(s), in every adapted layer and in its config.

    The weights do not depend on the ratio, so the model then trains and saves like one built with ``ratio``.
    Raises ``ValueError`` for a ratio outside ``[0, 1]`` or a model without CLIP-Adapter layers.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (the residual blend), got {ratio}.")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no CLIP-Adapter layers whose ratio could be set.")
    names = set()
    for layer in layers.values():
        for name in layer.active_adapters:
            layer.clip_adapter_ratio[name] = ratio
            names.add(name)
    for name in names:
        model.peft_config[name].ratio = ratio
