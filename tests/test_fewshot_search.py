"""The trainer's ``--ratio auto`` / ``--learning_rate auto`` and its checks of degenerate training.

The search must train each candidate exactly as the trainer would (a search member on all shots equals the
trainer's own run), record what it tried, and hand the winner to an ordinary run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture


def _args(tiny_clip_path: str, shapes_dir: str, tmp_path: Path, *extra: str) -> list[str]:
    # 4 shots x 4 classes, 2 views, batches of 8: 2 steps per epoch, 1 per epoch in a 3-shot fold.
    flags = dict(shots=4, views=2, num_train_epochs=4, per_device_train_batch_size=8, learning_rate=0.05)
    return [*helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path, **flags), *extra]


def test_ratio_auto_records_the_search_and_trains_the_winner(tiny_clip_path, shapes_dir, tmp_path):
    grid = ["--ratio_grid", "0.2", "0.6", "--learning_rate_grid", "0.01", "0.05"]
    argv = _args(tiny_clip_path, shapes_dir, tmp_path / "auto", "--ratio", "auto", "--learning_rate", "auto", *grid)
    auto = helpers.run_fewshot(argv).results
    search = auto["hyperparameter_search"]
    assert search["strategy"] == "4-fold cross-validation on 4 shots per class" and search["num_folds"] == 4
    assert (search["ratio_grid"], search["learning_rate_grid"]) == ([0.2, 0.6], [0.01, 0.05])
    assert [(c["ratio"], c["learning_rate"]) for c in search["candidates"]] == [
        (0.2, 0.01),
        (0.2, 0.05),
        (0.6, 0.01),
        (0.6, 0.05),
    ]
    for candidate in search["candidates"]:  # 16 shots, each held out once: a multiple of 1/16
        assert (16 * candidate["validation_accuracy"]) == pytest.approx(round(16 * candidate["validation_accuracy"]))
        assert len(candidate["fold_accuracy"]) == 4
    best = max(search["candidates"], key=lambda c: (c["validation_accuracy"], -c["validation_loss"]))
    assert (auto["ratio"], auto["learning_rate"]) == (search["ratio"], search["learning_rate"])
    assert (best["ratio"], best["learning_rate"]) == (search["ratio"], search["learning_rate"])
    out = tmp_path / "auto" / "out"
    assert json.loads((out / "all_results.json").read_text())["hyperparameter_search"] == search
    assert json.loads((out / "adapter_config.json").read_text())["ratio"] == search["ratio"]
    card = (out / "README.md").read_text()
    assert f"| hyperparameter_search | {search['summary']} |" in card and "; chose ratio" in search["summary"]

    # The final fit is an ordinary run with the winning values: the same adapter, bit for bit.
    winner = ["--ratio", str(search["ratio"]), "--learning_rate", str(search["learning_rate"])]
    fixed = helpers.run_fewshot(_args(tiny_clip_path, shapes_dir, tmp_path / "fixed", *winner)).results
    assert fixed["hyperparameter_search"] is None
    expected, actual = helpers.adapter_tensors(tmp_path / "fixed" / "out"), helpers.adapter_tensors(out)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert fixed["train_loss_per_epoch"] == auto["train_loss_per_epoch"]


def test_a_search_member_on_all_shots_is_the_trainers_adapter(tiny_clip_path, shapes_dir, tmp_path):
    """The batched trainer shuffles, batches, schedules and steps exactly like the trainer's loop."""
    from peft import get_peft_model
    from transformers import AutoProcessor, CLIPModel

    from peft_clip_adapter import CLIPAdapterClassifier, CLIPAdapterConfig, FeatureCache, encode_class_prompts
    from peft_clip_adapter.fewshot.data import build_train_transform, load_image_classification_data, sample_few_shot
    from peft_clip_adapter.fewshot.recipe import TrainingRecipe
    from peft_clip_adapter.fewshot.search import BatchedAdapterHeads, train_batched

    results = {}
    for ratio in (0.3, 0.7):
        argv = _args(tiny_clip_path, shapes_dir, tmp_path / str(ratio), "--ratio", str(ratio), "--adapt", "both")
        results[ratio] = helpers.run_fewshot([*argv, "--feature_cache_dir", str(tmp_path / "features")]).results

    torch.manual_seed(0)  # the trainer seeds with --seed right before building the adapter
    model = get_peft_model(CLIPModel.from_pretrained(tiny_clip_path), CLIPAdapterConfig(adapt="both"))
    processor = AutoProcessor.from_pretrained(tiny_clip_path)
    train = sample_few_shot(load_image_classification_data(train_dir=shapes_dir, seed=0)["train"], 4, seed=0)
    cache = FeatureCache(tmp_path / "features")
    transform = build_train_transform(processor.image_processor, seed=0, scale=(0.08, 1.0))
    train_set = cache.load_or_extract(model, train, transform, views=2)
    assert cache.last_hit
    names = list(results[0.3]["per_class_accuracy"])  # label order
    head = CLIPAdapterClassifier.from_model(
        model, encode_class_prompts(model, processor, names, results[0.3]["templates"])
    )
    layers = {"vision": head.vision_adapter, "text": head.text_adapter}
    inits = {branch: (layer.clip_adapter_down["default"].weight, layer.clip_adapter_up["default"].weight)
             for branch, layer in layers.items()}  # fmt: skip
    heads = BatchedAdapterHeads(head.class_embeddings, head.logit_scale, [0.3, 0.7], vision_init=inits["vision"],
                                text_init=inits["text"])  # fmt: skip
    recipe = TrainingRecipe(num_train_epochs=4, batch_size=8, seed=0)
    losses = train_batched(heads, train_set, [torch.arange(16)] * 2, [0.05, 0.05], recipe)
    for member, ratio in enumerate((0.3, 0.7)):
        saved = helpers.adapter_tensors(tmp_path / str(ratio) / "out")
        trained = heads.adapter_weights(member)
        for branch, projection in (("vision", "visual_projection"), ("text", "text_projection")):
            for part in ("down", "up"):
                key = next(k for k in saved if projection in k and f"clip_adapter_{part}" in k)
                torch.testing.assert_close(trained[f"{branch}_{part}"], saved[key], rtol=1e-4, atol=1e-6)
        assert losses[member].tolist() == pytest.approx(results[ratio]["train_loss_per_epoch"], rel=1e-4)


def test_one_shot_falls_back_and_nearly_identical_prompts_are_warned_about(tiny_clip_path, shapes_dir, tmp_path):
    # The tiny CLIP's prompts for 'blue triangle' and 'red circle' have a cosine of 0.97; lower the bar below it.
    lower_bar = "import peft_clip_adapter.fewshot.classifier as classifier\nclassifier.NEAR_DUPLICATE_COSINE = 0.97\n"
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--shots", "1", "--ratio", "auto", "--learning_rate", "auto")
    run = helpers.run_fewshot(argv, prelude=lower_bar)
    assert (run.results["ratio"], run.results["learning_rate"]) == (0.2, 2e-3)
    assert "nothing to hold out; fell back to the paper's values" in run.results["hyperparameter_search"]["strategy"]
    assert "Hyperparameter search: no search: a class has 1 shot" in run.log
    warning = "Classes with nearly identical prompt embeddings (cosine > 0.97): 'blue triangle' / 'red circle'"
    assert warning in " ".join(run.log.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "often"], r"--ratio must be a number or 'auto' \(chosen by cross-validation .*\), got 'often'"),
        (["--learning_rate", "fast"], r"--learning_rate must be a number or 'auto'"),
        (["--ratio_grid", "0.2", "1.5"], r"--ratio_grid values must be in \[0, 1\], got \[0.2, 1.5\]"),
        (["--learning_rate_grid", "0.01", "0"], r"--learning_rate_grid values must be > 0"),
        (["--search_folds", "1"], r"--search_folds must be at least 2"),
    ],
)  # fmt: skip
def test_bad_search_flags(tiny_clip_path, shapes_dir, tmp_path, extra, message):
    helpers.fewshot_error(_args(tiny_clip_path, shapes_dir, tmp_path, *extra), message)
