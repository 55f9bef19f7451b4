"""The pretrained micro-CLIP: a real zero-shot baseline, and the paper's recipe improving on it.

The micro-CLIP is pretrained once per session (``offline_cache_dir``). The trainer then runs on the
offline default's task (the 9 colour-shape pairs under the unseen ``dusk`` shift) for three seeds, each
with the paper's recipe: 16 shots, ratio 0.2, lr 2e-3, 200 epochs, cosine schedule after a warm-up
epoch (10 views; flips, no crops). Runs of one seed share their cached features.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peft_clip_adapter.testing.scene_tasks import SCENE_TASKS, render_task_images

_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

SEEDS = (1, 2, 3)
#: Trainer flags of each kind of run (beyond the offline default's, which are the paper's recipe).
RUNS = {
    "paper": [],
    "auto": ["--ratio", "auto"],
    "text": ["--adapt", "text"],
    "both": ["--adapt", "both"],
}


@pytest.fixture(scope="module")
def runs(offline_cache_dir, tmp_path_factory) -> dict[tuple[str, int], dict]:
    """Every kind of run for every seed, on the offline default (no model or data flags)."""
    out = tmp_path_factory.mktemp("micro-clip-runs")
    # Kind by kind, so that the two runs at a time have other seeds: each seed's first run caches the features
    # the later runs of that seed read.
    cells = [(kind, seed) for kind in RUNS for seed in SEEDS]
    argv = ["--cache_dir", str(offline_cache_dir)]
    argvs = [
        [*argv, "--seed", str(seed), *RUNS[kind], "--output_dir", str(out / f"{kind}-{seed}")] for kind, seed in cells
    ]
    results = dict(zip(cells, (run.results for run in helpers.run_fewshot_pairwise(argvs)), strict=True))
    return results


def test_pretraining_is_recorded_and_deterministic(micro_clip_path, tmp_path):
    """Same config and seed, same weights: a short run built twice (the full one takes a minute)."""
    from safetensors.torch import load_file

    from peft_clip_adapter.testing.microclip import PRETRAINING_FILE, PretrainingConfig, build_micro_clip

    report = json.loads((Path(micro_clip_path) / PRETRAINING_FILE).read_text())
    assert report["config"] == PretrainingConfig().__dict__ and report["held_out_pairs"][0] == ["circle", "blue"]
    assert report["final_loss"] < 3.0 < torch.log(torch.tensor(256.0))  # far below chance's ln(batch)
    short = PretrainingConfig(steps=3, batch_size=16, pool_size=64)
    first, second = (load_file(Path(build_micro_clip(tmp_path / name, short)) / "model.safetensors") for name in "ab")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_trainers_offline_tasks_are_the_packages():
    shown = helpers.run_fewshot(["--help"]).log  # named in the script, so that --help imports nothing
    assert "--offline_task {" + ",".join(sorted(SCENE_TASKS)) + "}" in shown


@pytest.mark.parametrize("task_name", sorted(SCENE_TASKS))
def test_zero_shot_is_at_least_twice_chance(micro_clip_path, task_name):
    from transformers import AutoProcessor, CLIPModel

    from peft_clip_adapter import CLIPAdapterClassifier, encode_class_prompts

    model, processor = (
        CLIPModel.from_pretrained(micro_clip_path).eval(),
        AutoProcessor.from_pretrained(micro_clip_path),
    )
    task = SCENE_TASKS[task_name]
    images, labels = render_task_images(task, 40, torch.Generator().manual_seed(7))
    pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    head = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, processor, list(task.classes)))
    with torch.no_grad():
        accuracy = (head(model.get_image_features(pixel_values=pixels).pooler_output).argmax(-1) == labels).float()
    assert accuracy.mean().item() >= 2 / len(task.classes)


@pytest.mark.slow
def test_papers_defaults_beat_zero_shot_by_ten_points(runs):
    for seed in SEEDS:
        result = runs["paper", seed]
        assert (result["ratio"], result["learning_rate"], result["shots"], result["views"]) == (0.2, 2e-3, 16, 10)
        assert len(result["train_loss_per_epoch"]) == 200
        assert result["eval_accuracy"] >= result["zero_shot_accuracy"] + 0.10, seed


@pytest.mark.slow
def test_ratio_auto_lands_within_two_points_of_the_best_ratio_on_the_test_images(runs, offline_cache_dir):
    """The test-best ratio comes from training every grid ratio on all shots, exactly as the trainer would
    (the search's batched trainer, shown equal to the trainer's loop in test_fewshot_search.py)."""
    gaps = []
    for seed in SEEDS:
        auto = runs["auto", seed]
        search = auto["hyperparameter_search"]
        assert search["strategy"] == "4-fold cross-validation on 16 shots per class"
        best = max(_test_accuracy_per_ratio(offline_cache_dir, seed, search["ratio_grid"]).values())
        gaps.append(best - auto["eval_accuracy"])
    assert sum(gaps) / len(gaps) <= 0.02, gaps


def _test_accuracy_per_ratio(
    cache_dir: Path, seed: int, ratios: list[float], task: str = "dusk-pairs"
) -> dict[float, float]:
    from peft import get_peft_model
    from transformers import AutoProcessor, CLIPModel

    from peft_clip_adapter import (
        CLIPAdapterClassifier,
        CLIPAdapterConfig,
        FeatureCache,
        build_eval_transform,
        build_train_transform,
        encode_class_prompts,
        load_image_classification_data,
        sample_few_shot,
    )
    from peft_clip_adapter.fewshot.recipe import TrainingRecipe
    from peft_clip_adapter.fewshot.search import BatchedAdapterHeads, train_batched

    root = Path(cache_dir) / "offline-default"
    model_path = str(next(root.glob("micro-clip-*")))
    model, processor = CLIPModel.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)
    torch.manual_seed(seed)  # the trainer's initial adapter for this seed
    model = get_peft_model(model, CLIPAdapterConfig()).eval()
    data = load_image_classification_data(
        train_dir=root / f"{task}-train", validation_dir=root / f"{task}-validation", seed=seed
    )
    train = sample_few_shot(data["train"], 16, seed=seed)
    cache = FeatureCache(Path(cache_dir) / "features")
    transform = build_train_transform(processor.image_processor, seed=seed, scale=(1.0, 1.0))  # the offline default
    train_set = cache.load_or_extract(model, train, transform, views=10)
    eval_set = cache.load_or_extract(model, data["validation"], build_eval_transform(processor.image_processor))
    assert cache.last_hit  # the trainer's runs cached exactly these features
    names = data["train"].features["label"].names
    head = CLIPAdapterClassifier.from_model(model, encode_class_prompts(model, processor, names))
    layer = head.vision_adapter
    heads = BatchedAdapterHeads(head.class_embeddings, head.logit_scale, ratios,
                                vision_init=(layer.clip_adapter_down["default"].weight,
                                             layer.clip_adapter_up["default"].weight))  # fmt: skip
    rows = [torch.arange(train_set.num_images)] * len(ratios)
    train_batched(heads, train_set, rows, [2e-3] * len(ratios), TrainingRecipe(seed=seed))
    with torch.no_grad():
        logits = heads(eval_set.features[0].expand(len(ratios), -1, -1))  # [R, N, C]
    accuracy = (logits.argmax(-1) == eval_set.labels).float().mean(dim=1)
    return dict(zip(ratios, accuracy.tolist(), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("adapt", ["text", "both"])
def test_text_and_joint_adapters_also_learn(runs, adapt):
    gains = [runs[adapt, seed]["eval_accuracy"] - runs[adapt, seed]["zero_shot_accuracy"] for seed in SEEDS]
    assert all(runs[adapt, seed]["adapt"] == adapt for seed in SEEDS)
    assert min(gains) > 0.0 and sum(gains) / len(gains) >= 0.05, gains
