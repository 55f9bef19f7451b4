"""The hyperparameter search: stratified folds, the batched trainer against one-at-a-time training, the choice."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.nn import functional as F

from peft_clip_adapter import CLIPAdapterClassifier, CLIPAdapterConfig, FeatureSet, adapter_layers
from peft_clip_adapter.fewshot.recipe import TrainingRecipe
from peft_clip_adapter.fewshot.search import (
    BatchedAdapterHeads,
    search_hyperparameters,
    set_ratio,
    stratified_folds,
    train_batched,
)


def test_stratified_folds_deal_every_class_evenly():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 4)
    folds = stratified_folds(labels, 4, seed=3)
    for label, count in ((0, 7), (1, 5), (2, 4)):
        per_fold = torch.bincount(folds[labels == label], minlength=4)
        assert per_fold.sum() == count and per_fold.max() - per_fold.min() <= 1
    assert torch.equal(folds, stratified_folds(labels, 4, seed=3))
    assert not torch.equal(folds, stratified_folds(labels, 4, seed=4))
    with pytest.raises(ValueError, match=r"num_folds=5 must be in \[2, 4\] \(the smallest class has 4 images\)"):
        stratified_folds(labels, 5)


def _classifier(tiny_clip, adapt: str, ratio: float, class_embeddings: torch.Tensor) -> CLIPAdapterClassifier:
    torch.manual_seed(0)  # the same initial adapter for every model
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(ratio=ratio, adapt=adapt))
    return CLIPAdapterClassifier.from_model(model, class_embeddings)


def _train_alone(head: CLIPAdapterClassifier, features: FeatureSet, rows: torch.Tensor, lr: float, recipe):
    """One adapter, the trainer's way: torch.optim.SGD, a seeded shuffle per epoch, view e % V, the schedule."""
    parameters = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    step, batch = 0, min(recipe.batch_size, len(rows))
    for epoch in range(recipe.num_train_epochs):
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(recipe.seed + epoch))]
        for start in range(0, recipe.steps_per_epoch(len(rows)) * batch, batch):
            chunk = order[start : start + batch]
            loss = F.cross_entropy(head(features.features[epoch % features.num_views, chunk]), features.labels[chunk])
            for group in optimizer.param_groups:
                group["lr"] = recipe.learning_rate_at(step, lr, num_images=len(rows))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1


@pytest.mark.parametrize("adapt", ["vision", "text", "both"])
def test_batched_members_equal_each_trained_alone(tiny_clip_path, adapt):
    """Members with other ratios, learning rates and row sets (so other batch counts) train independently."""
    from transformers import CLIPModel

    generator = torch.Generator().manual_seed(0)
    features = FeatureSet(torch.randn(3, 14, 32, generator=generator), torch.arange(14) % 4)  # [V, N, D]
    prompts = torch.randn(4, 2, 32, generator=generator)  # [C, T, D]
    recipe = TrainingRecipe(num_train_epochs=5, batch_size=4, seed=7)
    members = [(0.2, 0.05, torch.arange(14)), (0.6, 0.2, torch.arange(14)), (0.4, 0.1, torch.tensor([0, 3, 5, 9, 12]))]

    template = _classifier(CLIPModel.from_pretrained(tiny_clip_path), adapt, 0.2, prompts)
    heads = BatchedAdapterHeads(
        prompts,
        template.logit_scale,
        [ratio for ratio, _, _ in members],
        vision_init=_weights(template.vision_adapter),
        text_init=_weights(template.text_adapter),
    )
    losses = train_batched(heads, features, [rows for *_, rows in members], [lr for _, lr, _ in members], recipe)
    assert losses.shape == (3, 5) and torch.isfinite(losses).all()

    for member, (ratio, lr, rows) in enumerate(members):
        alone = _classifier(CLIPModel.from_pretrained(tiny_clip_path), adapt, ratio, prompts)
        _train_alone(alone, features, rows, lr, recipe)
        trained = heads.adapter_weights(member)
        for branch, layer in (("vision", alone.vision_adapter), ("text", alone.text_adapter)):
            if layer is None:
                assert f"{branch}_down" not in trained
                continue
            torch.testing.assert_close(trained[f"{branch}_down"], layer.clip_adapter_down["default"].weight)
            torch.testing.assert_close(trained[f"{branch}_up"], layer.clip_adapter_up["default"].weight)
        assert not torch.equal(trained[f"{'text' if adapt == 'text' else 'vision'}_down"], _init(template, adapt))


def _weights(layer):
    return (
        None if layer is None else (layer.clip_adapter_down["default"].weight, layer.clip_adapter_up["default"].weight)
    )


def _init(template: CLIPAdapterClassifier, adapt: str) -> torch.Tensor:
    layer = template.text_adapter if adapt == "text" else template.vision_adapter
    return layer.clip_adapter_down["default"].weight


def test_batched_heads_compute_the_classifiers_logits(tiny_clip):
    prompts = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(1))
    head = _classifier(tiny_clip, "both", 0.3, prompts)
    heads = BatchedAdapterHeads(
        prompts, head.logit_scale, [0.3, 0.3], vision_init=_weights(head.vision_adapter),
        text_init=_weights(head.text_adapter),
    )  # fmt: skip
    features = torch.randn(5, 32)
    expected = head(features)
    with torch.no_grad():
        actual = heads(features.expand(2, -1, -1))
    torch.testing.assert_close(actual, torch.stack([expected, expected]).detach())


def _separable_task(shots: int, noise: float = 0.3, seed: int = 0) -> tuple[FeatureSet, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 32, generator=generator)
    labels = torch.arange(3).repeat(shots)  # [N]
    views = centres[labels] + noise * torch.randn(2, len(labels), 32, generator=generator)  # [V, N, D]
    eval_view = centres[labels] + noise * torch.randn(len(labels), 32, generator=generator)
    return FeatureSet(views, labels), eval_view, centres


def test_search_scores_every_candidate_and_picks_the_best(tiny_clip):
    train, eval_view, centres = _separable_task(shots=4)
    # Prompts that point away from the classes: the adapter must rewrite a lot, so larger ratios win.
    prompts = (centres.roll(1, dims=0) + 0.5 * centres)[:, None, :]
    head = _classifier(tiny_clip, "vision", 0.2, prompts)
    recipe = TrainingRecipe(num_train_epochs=20, batch_size=8)
    result = search_hyperparameters(head, train, eval_view, ratios=[0.0, 0.8], learning_rates=[0.1], recipe=recipe)
    assert result.strategy == "4-fold cross-validation on 4 shots per class" and result.num_folds == 4
    assert [c["ratio"] for c in result.candidates] == [0.0, 0.8]
    zero, high = result.candidates
    assert len(zero["fold_accuracy"]) == 4 and zero["validation_accuracy"] == pytest.approx(
        sum(zero["fold_accuracy"]) / 4
    )  # 3 held-out images per fold: pooled = mean of the folds
    assert high["validation_accuracy"] > zero["validation_accuracy"] and result.ratio == 0.8
    assert result.learning_rate == 0.1 and result.seconds > 0
    assert "ratio 0 " in result.summary() and result.summary().endswith("; chose ratio 0.8, learning rate 0.1")
    # The head itself is untouched: the search trains copies.
    assert adapter_layers_ratio(head) == 0.2


def adapter_layers_ratio(head: CLIPAdapterClassifier) -> float:
    return head.vision_adapter.clip_adapter_ratio["default"]


def test_search_falls_back_with_one_shot_and_says_so(tiny_clip):
    train, eval_view, centres = _separable_task(shots=1)
    head = _classifier(tiny_clip, "vision", 0.2, centres[:, None, :])
    result = search_hyperparameters(head, train, eval_view, learning_rates=[1e-3, 1e-2], fallback=(0.2, 2e-3))
    assert (result.ratio, result.learning_rate, result.num_folds, result.candidates) == (0.2, 2e-3, 0, [])
    assert "1 shot, nothing to hold out" in result.strategy
    fixed_lr = search_hyperparameters(head, train, eval_view, learning_rates=[0.05], fallback=(0.2, 2e-3))
    assert fixed_lr.learning_rate == 0.05  # a grid of one is a fixed value, never replaced


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratios": []}, r"The grids must not be empty"),
        ({"ratios": [0.2, 1.5]}, r"Every candidate ratio must be in \[0, 1\], got \[0.2, 1.5\]"),
        ({"learning_rates": [0.0]}, r"Every candidate learning rate must be > 0"),
        ({"num_folds": 1}, r"num_folds must be at least 2"),
    ],
)
def test_search_rejects_bad_grids(tiny_clip, kwargs, message):
    train, eval_view, centres = _separable_task(shots=2)
    head = _classifier(tiny_clip, "vision", 0.2, centres[:, None, :])
    with pytest.raises(ValueError, match=message):
        search_hyperparameters(head, train, eval_view, **kwargs)


def test_search_rejects_eval_features_of_other_images(tiny_clip):
    train, eval_view, centres = _separable_task(shots=2)
    head = _classifier(tiny_clip, "vision", 0.2, centres[:, None, :])
    with pytest.raises(ValueError, match=r"eval_features must be \[6, 32\] \(one embedding per training image"):
        search_hyperparameters(head, train, eval_view[:5])


def test_set_ratio_changes_layers_and_config_but_not_weights(tiny_clip):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(ratio=0.2, adapt="both"))
    before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    set_ratio(model, 0.7)
    assert model.peft_config["default"].ratio == 0.7
    assert {branch: layer.clip_adapter_ratio["default"] for branch, layer in adapter_layers(model).items()} == {
        "vision": 0.7,
        "text": 0.7,
    }
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        set_ratio(model, -0.1)
    with pytest.raises(ValueError, match=r"CLIPModel has no CLIP-Adapter layers"):
        set_ratio(model.unload(), 0.5)
