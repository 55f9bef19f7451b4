"""The few-shot trainer ``examples/fewshot.py``, run in-process through its ``main(argv)``.

Short runs on the tiny CLIP fixture check the outputs, tracking, Hub upload and the cached vs end-to-end
equivalence; each bad input must fail with a clear ``ValueError`` before training. The offline default
(no arguments: the pretrained micro-CLIP, the paper's recipe) must beat zero-shot by 10 points on held-out
images.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fewshot, fresh_accelerate_state, online_hub = helpers.fewshot, helpers.fresh_accelerate_state, helpers.online_hub
RESULT_KEYS = {
    "zero_shot_accuracy",
    "eval_accuracy",
    "per_class_accuracy",
    "zero_shot_per_class_accuracy",
    "train_loss_per_epoch",
    "feature_extraction_seconds",
    "train_seconds",
    "num_train_images",
    "num_eval_images",
    "num_classes",
    "shots",
    "seed",
    "views",
    "ratio",
    "reduction",
    "adapt",
    "model_name_or_path",
    "dataset",
}
CLASSES = ["blue triangle", "green square", "red circle", "yellow cross"]


def _args(tiny_clip_path: str, shapes_dir: str, tmp_path: Path, *extra: str) -> list[str]:
    # 12 images per class: 10 train / 2 held out each; 4 shots -> 16 training images = one global batch of 16.
    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05)
    return [*helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path, **flags), *extra]


def test_short_run_writes_adapter_results_and_plot(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    results = fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path))
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
        "all_results.json",
        "class_prompts.json",
        "training_curves.png",
    ]
    saved = json.loads((out / "all_results.json").read_text())
    assert set(saved) >= RESULT_KEYS
    assert saved == json.loads(json.dumps(results))
    assert (saved["num_train_images"], saved["num_eval_images"], saved["num_classes"]) == (16, 8, 4)
    assert (saved["shots"], saved["views"], saved["ratio"], saved["reduction"], saved["adapt"]) == (
        4,
        2,
        0.2,
        4,
        "vision",
    )
    assert sorted(saved["per_class_accuracy"]) == CLASSES
    assert len(saved["train_loss_per_epoch"]) == 3
    assert all(loss > 0 for loss in saved["train_loss_per_epoch"])
    # 2 eval images per class: every accuracy is a multiple of 1/2 and the mean of the per-class ones.
    per_class = list(saved["per_class_accuracy"].values())
    assert saved["eval_accuracy"] == pytest.approx(sum(per_class) / 4)
    assert all(value in (0.0, 0.5, 1.0) for value in per_class)
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "import peft_clip_adapter" in card and "zero_shot_accuracy" in card
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["ratio"], config["base_model_name_or_path"]) == (
        "CLIP_ADAPTER",
        0.2,
        tiny_clip_path,
    )


def test_saved_adapter_reloads_with_the_reported_accuracy(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    """The adapter on disk, reloaded with peft, classifies the held-out images exactly as reported."""
    from peft import PeftModel
    from transformers import AutoProcessor, CLIPModel

    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts
    from peft_clip_adapter.fewshot.data import build_eval_transform, load_image_classification_data
    from peft_clip_adapter.fewshot.features import FeatureCache

    results = fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--adapt", "both", "--templates", "ensemble"))
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), str(tmp_path / "out")).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_path)
    heldout = load_image_classification_data(train_dir=shapes_dir, seed=0)["validation"]
    cache = FeatureCache(tmp_path / "cache" / "features")
    eval_set = cache.load_or_extract(model, heldout, build_eval_transform(processor.image_processor))
    assert cache.last_hit  # the run cached exactly these eval features
    prompts = encode_class_prompts(model, processor, CLASSES, results["templates"])
    with torch.no_grad():
        logits = CLIPAdapterClassifier.from_model(model, prompts)(eval_set.features[0])  # [8, 4]
    accuracy = (logits.argmax(-1) == eval_set.labels).float().mean().item()
    assert len(results["templates"]) == 7
    assert accuracy == pytest.approx(results["eval_accuracy"])


def test_cached_features_and_end_to_end_train_the_same_adapter(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    cached = fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path / "cached"))
    end_to_end = fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path / "e2e", "--end_to_end"))
    first = helpers.adapter_tensors(tmp_path / "cached" / "out")
    second = helpers.adapter_tensors(tmp_path / "e2e" / "out")
    assert sorted(first) == sorted(second)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5)
    assert cached["train_loss_per_epoch"] == pytest.approx(end_to_end["train_loss_per_epoch"], rel=1e-4)
    assert cached["eval_accuracy"] == end_to_end["eval_accuracy"]


def test_tensorboard_tracking_and_overwrite(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    stale = tmp_path / "out" / "step_5"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"completed_steps": 5}))
    fewshot.main(
        _args(tiny_clip_path, shapes_dir, tmp_path, "--with_tracking", "--report_to", "tensorboard",
              "--overwrite_output_dir", "--checkpointing_steps", "epoch")
    )  # fmt: skip
    out = tmp_path / "out"
    assert list((out / "fewshot").rglob("events.out.tfevents.*"))
    assert not stale.exists()  # the previous run's checkpoint is gone, so `latest` cannot pick it
    assert sorted(path.name for path in out.glob("epoch_*")) == ["epoch_1", "epoch_2", "epoch_3"]


def test_push_to_hub_uploads_the_adapter_with_results(fewshot, tiny_clip_path, shapes_dir, tmp_path, online_hub):
    results = fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--push_to_hub", "--hub_model_id", "shapes"))
    assert online_hub.created == ["shapes", "me/shapes"]  # checked before training, then pushed
    [upload] = online_hub.uploads
    assert upload.repo_id == "me/shapes"
    assert sorted(upload.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
        "class_prompts.json",
    ]
    card = upload.files["README.md"].decode()
    assert "| shots | 4 |" in card and "| ratio | 0.2 |" in card
    assert f"| accuracy | {results['eval_accuracy']:.4g} |" in card
    assert f"| zero_shot_accuracy | {results['zero_shot_accuracy']:.4g} |" in card
    assert f"| base_model | {Path(tiny_clip_path).name} (local folder) |" in card and tiny_clip_path not in card
    assert 'FewShotClassifier.from_pretrained("me/shapes", base_model="<base model id>")' in card
    pushed, saved = load(upload.files["adapter_model.safetensors"]), helpers.adapter_tensors(tmp_path / "out")
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[key], saved[key]) for key in saved)


# -----------------------------------------------------------------------------
# Bad input: each a clear error before training


def _integer_label_args(model: str, shapes_dir: str, tmp_path: Path) -> list[str]:
    import datasets

    saved = datasets.load_dataset("imagefolder", data_dir=shapes_dir, split="train")
    saved.cast_column("label", datasets.Value("int64")).save_to_disk(tmp_path / "saved")
    argv = _args(model, shapes_dir, tmp_path, "--dataset_name", str(tmp_path / "saved"))
    argv.remove("--train_dir")
    argv.remove(str(shapes_dir))
    return argv


def test_integer_labels_without_names_train_with_a_warning(fewshot, shapes_dir, tmp_path, caplog):
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    model = build_tiny_clip(tmp_path / "digits-clip", words=["0", "1", "2", "3"])  # a tokenizer that knows digits
    caplog.set_level("WARNING")
    results = fewshot.main(_integer_label_args(model, shapes_dir, tmp_path))
    assert "holds integer ids without class names, so the prompts name the classes ['0', '1', '2', '3']" in caplog.text
    assert list(results["per_class_accuracy"]) == ["0", "1", "2", "3"] and results["num_train_images"] == 16


def test_classes_with_identical_prompts_are_refused_before_training(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    """The tiny CLIP's tokenizer does not know '0'...'3': every prompt encodes to the same embedding."""
    with pytest.raises(ValueError, match=r"Classes '0' and '1'; '0' and '2'; .* have identical prompt embeddings"):
        fewshot.main(_integer_label_args(tiny_clip_path, shapes_dir, tmp_path))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_missing_column_lists_the_columns(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"Image column 'img' not found; the dataset has columns \['image', 'label'\]"
    ):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--image_column_name", "img"))
    with pytest.raises(ValueError, match=r"Label column 'class' not found; the dataset has columns"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path / "2", "--label_column_name", "class"))


def test_unreadable_image_is_named(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data / "train")
    shutil.copytree(shapes_dir, data / "validation")
    broken = data / "validation" / "red circle" / "001.png"
    broken.write_bytes(b"not a png")
    argv = _args(tiny_clip_path, str(data / "train"), tmp_path, "--validation_dir", str(data / "validation"))
    with pytest.raises(ValueError, match=r"Cannot read image file .*red circle/001\.png"):
        fewshot.main(argv)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unreadable_training_image_fails_before_end_to_end_training(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data / "train")
    shutil.copytree(shapes_dir, data / "validation")
    (data / "train" / "green square" / "003.png").write_bytes(b"\x89PNG broken")
    # 12 shots: every training image is sampled, the broken one too.
    argv = _args(tiny_clip_path, str(data / "train"), tmp_path, "--validation_dir", str(data / "validation"))
    argv += ["--end_to_end", "--shots", "12"]
    with pytest.raises(ValueError, match=r"Cannot read image file .*green square/003\.png"):
        fewshot.main(argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "0"], r"--shots must be at least 1, got 0"),
        (["--views", "0"], r"--views must be at least 1, got 0"),
        (["--ratio", "1.5"], r"--ratio must be in \[0, 1\]"),
        (["--learning_rate", "0"], r"--learning_rate must be > 0"),
        (["--checkpointing_steps", "often"], r"--checkpointing_steps 'often' must be a whole number of steps"),
        (["--templates", "a photo of a {}.", "a thing"], r"\['a thing'\] have no '\{\}' placeholder"),
        (["--templates", "imagenet21k"], r"Unknown template set 'imagenet21k'"),
    ],
)
def test_bad_numbers_and_templates(fewshot, tiny_clip_path, shapes_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, *extra))


def test_more_shots_than_a_class_has(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    with pytest.raises(ValueError, match=r"shots"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--shots", "50"))


def test_single_class_dataset(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    data = tmp_path / "one-class"
    shutil.copytree(Path(shapes_dir) / "red circle", data / "red circle")
    with pytest.raises(ValueError, match=r"class.*at least 2|2 classes"):
        fewshot.main(_args(tiny_clip_path, str(data), tmp_path))


def test_output_dir_with_another_runs_files(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "all_results.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"already holds another run's files \(all_results.json\).*--overwrite_output_dir"
    ):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*file is a file"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--output_dir", str(tmp_path / "file")))


def test_model_without_image_and_text_towers(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

    folder = tmp_path / "vision-only"
    CLIPVisionModel(CLIPModel.from_pretrained(tiny_clip_path).config.vision_config).save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny_clip_path).save_pretrained(folder)
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--model_name_or_path", str(folder))
    with pytest.raises(
        ValueError, match=r"CLIPVisionModel from .* has no vision / text tower with a pooled embedding \(it has no "
    ):
        fewshot.main(argv)


def test_data_without_model_and_model_without_data(fewshot, shapes_dir, tiny_clip_path):
    with pytest.raises(ValueError, match=r"Pass --model_name_or_path with your own data"):
        fewshot.main(["--train_dir", shapes_dir])
    with pytest.raises(ValueError, match=r"needs data: --dataset_name or --train_dir"):
        fewshot.main(["--model_name_or_path", tiny_clip_path])


def test_world_size_without_processes_fails_loudly(fewshot, tiny_clip_path, shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 but Accelerate sees one process"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path))


def test_learning_rate_schedule_is_coops(fewshot):
    """Constant 1e-5 warm-up epoch, then the cosine over the whole run (CoOp's ConstantWarmupScheduler)."""
    args = fewshot.parse_args(["--learning_rate", "0.002", "--num_train_epochs", "4"])
    # 2 steps per epoch, 8 in all, warm-up = one epoch.
    rates = [fewshot.learning_rate_at(step, args, warmup_steps=2, total_steps=8) for step in range(8)]
    assert rates[:2] == [1e-5, 1e-5]
    # After it, 0.5 * lr * (1 + cos(pi * step / 8)): step 2 is a quarter of the way, step 4 halfway.
    assert rates[2:] == pytest.approx(
        [
            0.001 * (1 + 2**-0.5),
            0.001 * (1 + 0.3826834),
            0.001,
            0.001 * (1 - 0.3826834),
            0.001 * (1 - 2**-0.5),
            0.001 * (1 - 0.9238795),
        ]
    )


# -----------------------------------------------------------------------------
# The offline default


@pytest.mark.slow
def test_offline_default_beats_zero_shot(fewshot, offline_cache_dir, tmp_path, caplog):
    """No model, no data: the pretrained micro-CLIP and the generated dusk-pairs task, with the paper's recipe."""
    caplog.set_level("WARNING")
    results = fewshot.main(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(offline_cache_dir)])
    assert "a micro-CLIP pretrained on generated captioned scenes" in caplog.text
    assert (results["shots"], results["ratio"], results["learning_rate"], results["views"]) == (16, 0.2, 2e-3, 10)
    assert (results["num_classes"], results["num_train_images"], results["num_eval_images"]) == (9, 144, 450)
    assert results["dataset"] == "offline-dusk-pairs" and len(results["train_loss_per_epoch"]) == 200
    assert results["zero_shot_accuracy"] >= 2 / 9  # a real zero-shot baseline: twice chance or more
    assert results["eval_accuracy"] >= results["zero_shot_accuracy"] + 0.10
    assert "has not moved" not in caplog.text


def test_same_seed_same_adapter_on_a_first_and_a_later_run(fewshot, tmp_path, monkeypatch):
    """The first offline run builds its model and images (which reseeds torch); a later run reuses them."""
    from peft_clip_adapter.testing.microclip import PretrainingConfig

    monkeypatch.setattr(fewshot, "MICRO_CLIP_CONFIG", PretrainingConfig(steps=2, batch_size=16, pool_size=64))
    argv = ["--cache_dir", str(tmp_path / "cache"), "--num_train_epochs", "3"]
    first = fewshot.main([*argv, "--output_dir", str(tmp_path / "first")])
    later = fewshot.main([*argv, "--output_dir", str(tmp_path / "later")])
    expected, actual = helpers.adapter_tensors(tmp_path / "first"), helpers.adapter_tensors(tmp_path / "later")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert first["train_loss_per_epoch"] == later["train_loss_per_epoch"]
