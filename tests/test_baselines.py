"""The few-shot baselines: each against a hand computation, no test leakage, and CLIP-Adapter equal to the script.

Tip-Adapter's logits and the linear probe's starting point are checked on tiny tensors; every method's chosen
hyperparameters must not move when the test labels are permuted; CLIP-Adapter trained in process must give the
adapter and the accuracy ``examples/fewshot.py`` gives with the same seed and settings.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from peft_clip_adapter.fewshot.baselines import linear_probe, tip_adapter
from peft_clip_adapter.fewshot.baselines.methods import (
    METHODS,
    EvalSet,
    FewShotCell,
    MethodSettings,
    parse_methods,
    run_method,
)
from peft_clip_adapter.fewshot.baselines.zero_shot import text_prototypes, zero_shot_logits
from peft_clip_adapter.fewshot.features import FeatureSet

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture


def test_tip_adapter_logits_match_a_hand_computation():
    # Unit vectors in 2-D: the test image f = (1, 0); keys at 0 and 90 degrees; prototypes along the axes.
    features = torch.tensor([[2.0, 0.0]])  # raw: normalised inside
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0])  # the key along f belongs to class 1
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = tip_adapter.tip_logits(features, keys, labels, prototypes, 10.0, alpha=2.0, beta=3.0)
    # clip: 10 * (1, 0); cache: key 0 (cos 1) -> exp(0) = 1 to class 1, key 1 (cos 0) -> exp(-3) to class 0.
    expected = torch.tensor([[10.0 + 2.0 * math.exp(-3.0), 0.0 + 2.0 * 1.0]])
    torch.testing.assert_close(logits, expected)


def test_cache_keys_average_the_unit_views_and_renormalise():
    views = torch.tensor([[[3.0, 0.0]], [[0.0, 5.0]]])  # one image, two views: (1, 0) and (0, 1) once unit
    keys = tip_adapter.cache_keys(FeatureSet(views, torch.tensor([0])))
    torch.testing.assert_close(keys, torch.tensor([[1.0, 1.0]]) / math.sqrt(2.0))


def test_tip_adapter_grid_follows_the_authors_formula():
    assert len(tip_adapter.BETA_GRID) == 200 and len(tip_adapter.ALPHA_GRID) == 20
    assert tip_adapter.BETA_GRID[0] == pytest.approx(0.1) and tip_adapter.BETA_GRID[1] == pytest.approx(
        0.1 + 11.9 / 200
    )
    assert tip_adapter.ALPHA_GRID[-1] == pytest.approx(19 * 9.9 / 20 + 0.1)


def test_the_linear_probe_starts_as_zero_shot():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 2, 8, generator=generator)  # 3 classes, 2 templates
    prototypes = text_prototypes(embeddings)
    hand = F.normalize(F.normalize(embeddings, dim=-1).mean(dim=1), dim=-1)
    torch.testing.assert_close(prototypes, hand)
    train = FeatureSet(torch.randn(2, 6, 8, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))
    untrained = linear_probe.train_linear_probe(train, prototypes, 50.0, steps=0)
    test = torch.randn(5, 8, generator=generator)
    torch.testing.assert_close(
        linear_probe.linear_probe_logits(test, untrained, 50.0), zero_shot_logits(test, prototypes, 50.0)
    )
    trained = linear_probe.train_linear_probe(train, prototypes, 50.0, steps=5)
    assert not torch.equal(trained, prototypes)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        linear_probe.train_linear_probe(train, prototypes, 50.0, steps=-1)


def test_tip_adapter_falls_back_with_one_shot_and_searches_with_more():
    generator = torch.Generator().manual_seed(1)
    prototypes = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    one = FeatureSet(torch.randn(2, 3, 8, generator=generator), torch.tensor([0, 1, 2]))
    _, choice = tip_adapter.fit_tip_adapter(one, one.features[0], prototypes, 20.0, fine_tune=False)
    assert (choice.alpha, choice.beta) == tip_adapter.FALLBACK and "nothing to hold out" in choice.strategy
    labels = torch.arange(3).repeat(4)
    four = FeatureSet(torch.randn(2, 12, 8, generator=generator), labels)
    keys, choice = tip_adapter.fit_tip_adapter(four, four.features[0], prototypes, 20.0, fine_tune=True, num_folds=2)
    assert choice.strategy == "2-fold cross-validation on 4 shots per class"
    assert choice.alpha in tip_adapter.ALPHA_GRID and choice.beta in tip_adapter.BETA_GRID
    assert choice.extra == {"fine_tune_epochs": 100}  # 3 classes: a small set, as EuroSAT
    assert keys.shape == (12, 8) and not torch.allclose(keys, tip_adapter.cache_keys(four))


def test_methods_parse_all_or_a_list_and_name_the_known_ones():
    assert parse_methods("all") == list(METHODS)
    with pytest.raises(ValueError, match=r"Unknown method\(s\) \['coop'\]; choose 'all' or names from \['zero-shot'"):
        parse_methods("zero-shot,coop")


def _cell(tiny_clip_path: str, seed: int = 0) -> tuple[FewShotCell, EvalSet]:
    """Synthetic cached features of 4 classes (the tiny CLIP's width, 32) and a test set of 12 images."""
    from peft_clip_adapter.testing.tiny_models import SHAPE_CLASSES

    generator = torch.Generator().manual_seed(seed)
    names = list(SHAPE_CLASSES)
    embeddings = torch.randn(4, 1, 32, generator=generator)
    centres = F.normalize(embeddings[:, 0], dim=-1)
    labels = torch.arange(4).repeat(3)
    train = FeatureSet(centres[labels][None] + 0.8 * torch.randn(2, 12, 32, generator=generator), labels)
    train_eval = FeatureSet(train.features[:1].clone(), labels)
    test = FeatureSet(centres[labels][None] + 0.8 * torch.randn(1, 12, 32, generator=generator), labels)
    cell = FewShotCell(tiny_clip_path, names, ["a photo of a {}."], embeddings, 30.0, train, train_eval, 3, seed)
    return cell, EvalSet("test", test, names, embeddings, list(range(4)))


@pytest.mark.parametrize("method", [name for name in METHODS if name != "lora"])
def test_permuted_test_labels_leave_the_chosen_hyperparameters_unchanged(method, tiny_clip_path):
    cell, test = _cell(tiny_clip_path)
    settings = MethodSettings(num_train_epochs=3, ratio_grid=(0.2, 0.6))
    first = run_method(method, cell, [test], settings)
    permuted = test.features.labels[torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    shuffled = EvalSet(
        "test", FeatureSet(test.features.features, permuted), test.class_names, test.class_embeddings, [0, 1, 2, 3]
    )  # noqa: E501
    helpers.reset_accelerate_state()
    second = run_method(method, cell, [shuffled], settings)
    assert second.hyperparameters == first.hyperparameters
    if method == "clip-adapter-auto":
        assert first.hyperparameters["strategy"] == "3-fold cross-validation on 3 shots per class"


def test_methods_that_cannot_classify_unseen_classes_report_zero_shot(tiny_clip_path):
    cell, test = _cell(tiny_clip_path)
    unseen = EvalSet("novel", test.features, test.class_names, test.class_embeddings, None)
    zero_shot = run_method("zero-shot", cell, [unseen], MethodSettings()).accuracy["novel"]
    for method in ("linear-probe", "tip-adapter"):
        result = run_method(method, cell, [unseen], MethodSettings())
        assert result.zero_shot_for == ["novel"] and result.accuracy["novel"] == zero_shot


@pytest.mark.slow
def test_the_clip_adapter_row_equals_the_trainer_script(tiny_clip_path, tmp_path):
    """Same seed, shots, views, epochs and templates: the same adapter and the same accuracy as the script."""
    from peft_clip_adapter.testing.tiny_models import write_shapes_dataset

    folder = tmp_path / "data"
    write_shapes_dataset(folder / "train", images_per_class=4, seed=0)
    write_shapes_dataset(folder / "test", images_per_class=5, seed=1)
    flags = ["--shots", "2", "--num_train_epochs", "6", "--views", "2"]
    script = helpers.run_fewshot(
        ["--model_name_or_path", tiny_clip_path, "--train_dir", str(folder / "train"), "--validation_dir",
         str(folder / "test"), "--templates", "dtd", "--seed", "1", "--output_dir", str(tmp_path / "script"),
         "--cache_dir", str(tmp_path / "cache"), "--learning_rate", "0.002", *flags]
    )  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reproduce

    report = reproduce.main(
        ["--model_name_or_path", tiny_clip_path, "--datasets", "dtd", "--dataset_dir", f"dtd={folder}",
         "--methods", "clip-adapter", "--seeds", "1", "--output_dir", str(tmp_path / "reproduce"), *flags]
    )  # fmt: skip
    (row,) = report["rows"]
    assert row["hyperparameters"]["ratio"] == script.results["ratio"] == 0.2
    assert row["accuracy"] == pytest.approx(100.0 * script.results["eval_accuracy"])

    # The weights too: the in-process adapter is the script's, bit for bit up to float summation order.
    from peft_clip_adapter.fewshot import data, training
    from peft_clip_adapter.fewshot.baselines.clip_adapter import train_clip_adapter
    from peft_clip_adapter.fewshot.features import FeatureCache
    from peft_clip_adapter.fewshot.templates import templates_for

    helpers.reset_accelerate_state()
    model, processor = training.load_adapted_model(tiny_clip_path)
    train, _, names = training.load_few_shot_data(
        shots=2, seed=1, train_dir=str(folder / "train"), validation_dir=str(folder / "test")
    )
    cache = FeatureCache(tmp_path / "features")
    transform = data.build_train_transform(processor.image_processor, seed=1, scale=(0.08, 1.0))
    views = cache.load_or_extract(model, train, transform, views=2)
    eval_view = cache.load_or_extract(model, train, data.build_eval_transform(processor.image_processor))
    adapter = train_clip_adapter(
        tiny_clip_path, names, templates_for("dtd"), views, eval_view, seed=1, num_train_epochs=6
    )  # noqa: E501
    ours = {
        name.split("base_model.model.")[-1]: p
        for name, p in adapter.peft_model.state_dict().items()
        if "clip_adapter_" in name
    }  # noqa: E501
    theirs = helpers.adapter_tensors(tmp_path / "script")
    assert len(theirs) == 2
    for name, tensor in theirs.items():
        match = [value for key, value in ours.items() if key.replace(".default", "") in name]
        torch.testing.assert_close(match[0], tensor)
