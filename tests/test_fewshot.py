"""The few-shot trainer ``examples/fewshot.py``, run as users run it, and the toolkit code it trains with.

Short runs on the tiny CLIP fixture check the outputs, tracking, checkpoints, Hub upload and the cached vs
end-to-end equivalence; each bad input must be one ``error:`` line (exit code 2) before training. The
offline default (no arguments: the pretrained micro-CLIP, the paper's recipe) must beat zero-shot by 10
points on held-out images.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture
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
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_manifest.json", "adapter_model.safetensors"]


def _args(tiny_clip_path: str, shapes_dir: str, tmp_path: Path, *extra: str) -> list[str]:
    # 12 images per class: 10 train / 2 held out each; 4 shots -> 16 training images = one global batch of 16.
    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05)
    return [*helpers.trainer_args(tiny_clip_path, shapes_dir, tmp_path, **flags), *extra]


@pytest.fixture(scope="module")
def tracked_run(tiny_clip_path, shapes_dir, tmp_path_factory):
    """A run with both adapters, the template ensemble, tracking and a checkpoint per epoch, over a stale run."""
    run = tmp_path_factory.mktemp("tracked")
    stale = run / "out" / "step_5"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"completed_steps": 5}))
    argv = _args(tiny_clip_path, shapes_dir, run, "--adapt", "both", "--templates", "ensemble")
    argv += [
        "--with_tracking",
        "--report_to",
        "tensorboard",
        "--overwrite_output_dir",
        "--checkpointing_steps",
        "epoch",
    ]
    return run, argv, helpers.run_fewshot(argv).results


def test_a_run_writes_adapter_results_plot_checkpoints_and_logs(tracked_run, tiny_clip_path):
    run, _, results = tracked_run
    out = run / "out"
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [*ADAPTER_FILES, "all_results.json", "class_prompts.json", "training_curves.png", "fewshot"]
        + ["epoch_1", "epoch_2", "epoch_3"]
    )  # the stale step_5 is gone, so `latest` cannot pick it
    assert list((out / "fewshot").rglob("events.out.tfevents.*"))
    saved = json.loads((out / "all_results.json").read_text())
    assert set(saved) >= RESULT_KEYS and saved == results
    assert (saved["num_train_images"], saved["num_eval_images"], saved["num_classes"]) == (16, 8, 4)
    assert (saved["shots"], saved["views"], saved["ratio"], saved["reduction"], saved["adapt"]) == (
        4,
        2,
        0.2,
        4,
        "both",
    )
    assert sorted(saved["per_class_accuracy"]) == CLASSES
    assert len(saved["train_loss_per_epoch"]) == 3 and all(loss > 0 for loss in saved["train_loss_per_epoch"])
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
    state = json.loads((out / "epoch_3" / "trainer_state.json").read_text())
    assert state["train_loss_per_epoch"] == results["train_loss_per_epoch"] and state["settings"]["adapt"] == "both"


def test_saved_adapter_reloads_with_the_reported_accuracy(tracked_run, tiny_clip_path, shapes_dir):
    """The adapter on disk, reloaded with peft, classifies the held-out images exactly as reported."""
    from peft import PeftModel
    from transformers import AutoProcessor, CLIPModel

    from peft_clip_adapter.fewshot.classifier import CLIPAdapterClassifier, encode_class_prompts
    from peft_clip_adapter.fewshot.data import build_eval_transform, load_image_classification_data
    from peft_clip_adapter.fewshot.features import FeatureCache

    run, _, results = tracked_run
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), str(run / "out")).eval()
    processor = AutoProcessor.from_pretrained(tiny_clip_path)
    heldout = load_image_classification_data(train_dir=shapes_dir, seed=0)["validation"]
    cache = FeatureCache(run / "cache" / "features")
    eval_set = cache.load_or_extract(model, heldout, build_eval_transform(processor.image_processor))
    assert cache.last_hit  # the run cached exactly these eval features
    prompts = encode_class_prompts(model, processor, CLASSES, results["templates"])
    with torch.no_grad():
        logits = CLIPAdapterClassifier.from_model(model, prompts)(eval_set.features[0])  # [8, 4]
    accuracy = (logits.argmax(-1) == eval_set.labels).float().mean().item()
    assert len(results["templates"]) == 7
    assert accuracy == pytest.approx(results["eval_accuracy"])


def test_end_to_end_trains_the_same_adapter_and_pushes_it(tracked_run, tiny_clip_path, shapes_dir, tmp_path):
    """--end_to_end (the backbone on every step) gives the cached run's adapter; --push_to_hub uploads it."""
    from safetensors.torch import load_file

    cached_run, _, cached = tracked_run
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--adapt", "both", "--templates", "ensemble", "--end_to_end")
    argv += ["--push_to_hub", "--hub_model_id", "shapes"]
    end_to_end = helpers.run_fewshot(argv, prelude=helpers.fake_hub_prelude(tmp_path / "hub")).results
    first, second = helpers.adapter_tensors(cached_run / "out"), helpers.adapter_tensors(tmp_path / "out")
    assert sorted(first) == sorted(second)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-5)
    assert cached["train_loss_per_epoch"] == pytest.approx(end_to_end["train_loss_per_epoch"], rel=1e-4)
    assert cached["eval_accuracy"] == end_to_end["eval_accuracy"]

    hub = tmp_path / "hub"
    assert (hub / "created.txt").read_text().split() == ["shapes", "me/shapes"]  # checked before training, pushed
    [upload] = (hub / "uploads").iterdir()
    assert upload.name == "me--shapes"
    assert sorted(path.name for path in upload.iterdir()) == sorted([*ADAPTER_FILES, "class_prompts.json"])
    card = (upload / "README.md").read_text()
    assert "| shots | 4 |" in card and "| ratio | 0.2 |" in card
    assert f"| accuracy | {end_to_end['eval_accuracy']:.4g} |" in card
    assert f"| zero_shot_accuracy | {end_to_end['zero_shot_accuracy']:.4g} |" in card
    assert f"| base_model | {Path(tiny_clip_path).name} (local folder) |" in card and tiny_clip_path not in card
    assert 'FewShotClassifier.from_pretrained("me/shapes", base_model="<base model id>")' in card
    pushed = load_file(upload / "adapter_model.safetensors")
    assert pushed.keys() == second.keys() and all(torch.equal(pushed[key], second[key]) for key in second)


# -----------------------------------------------------------------------------
# Bad input: each one `error:` line before training


def _integer_label_args(model: str, shapes_dir: str, tmp_path: Path) -> list[str]:
    import datasets

    saved = datasets.load_dataset("imagefolder", data_dir=shapes_dir, split="train")
    saved.cast_column("label", datasets.Value("int64")).save_to_disk(tmp_path / "saved")
    argv = _args(model, shapes_dir, tmp_path, "--dataset_name", str(tmp_path / "saved"))
    argv.remove("--train_dir")
    argv.remove(str(shapes_dir))
    return argv


def test_integer_labels_without_names_train_with_a_warning(shapes_dir, tmp_path):
    from peft_clip_adapter.testing.tiny_models import build_tiny_clip

    model = build_tiny_clip(tmp_path / "digits-clip", words=["0", "1", "2", "3"])  # a tokenizer that knows digits
    run = helpers.run_fewshot(_integer_label_args(model, shapes_dir, tmp_path))
    assert "holds integer ids without class names, so the prompts name the classes ['0', '1', '2', '3']" in run.log
    assert list(run.results["per_class_accuracy"]) == ["0", "1", "2", "3"] and run.results["num_train_images"] == 16


def test_classes_with_identical_prompts_are_refused_before_training(tiny_clip_path, shapes_dir, tmp_path):
    """The tiny CLIP's tokenizer does not know '0'...'3': every prompt encodes to the same embedding."""
    match = r"Classes '0' and '1'; '0' and '2'; .* have identical prompt embeddings"
    helpers.fewshot_error(_integer_label_args(tiny_clip_path, shapes_dir, tmp_path), match)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def _broken_copy(shapes_dir: str, tmp_path: Path, split: str, image: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data / "train")
    shutil.copytree(shapes_dir, data / "validation")
    (data / split / image).write_bytes(b"\x89PNG broken")
    return data


def test_unreadable_image_is_named(tiny_clip_path, shapes_dir, tmp_path):
    data = _broken_copy(shapes_dir, tmp_path, "validation", "red circle/001.png")
    argv = _args(tiny_clip_path, str(data / "train"), tmp_path, "--validation_dir", str(data / "validation"))
    helpers.fewshot_error(argv, r"Cannot read image file .*red circle/001\.png")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unreadable_training_image_fails_before_end_to_end_training(tiny_clip_path, shapes_dir, tmp_path):
    data = _broken_copy(shapes_dir, tmp_path, "train", "green square/003.png")
    # 12 shots: every training image is sampled, the broken one too.
    argv = _args(tiny_clip_path, str(data / "train"), tmp_path, "--validation_dir", str(data / "validation"))
    helpers.fewshot_error([*argv, "--end_to_end", "--shots", "12"], r"Cannot read image file .*green square/003\.png")


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
        (["--model_name_or_path", "x", "--train_dir", "y", "--dataloader_num_workers", "-1"], r"must be >= 0 \(0 "),
    ],
)
def test_bad_numbers_and_templates_are_refused_before_anything_loads(extra, message):
    helpers.fewshot_error(extra, message)  # a fraction of a second: refused before the heavy imports


def test_data_without_model_and_model_without_data(shapes_dir, tiny_clip_path):
    helpers.fewshot_error(["--train_dir", shapes_dir], r"Pass --model_name_or_path with your own data")
    helpers.fewshot_error(["--model_name_or_path", tiny_clip_path], r"needs data: --dataset_name or --train_dir")


def test_more_shots_than_a_class_has(shapes_dir):
    from peft_clip_adapter.fewshot.data import load_image_classification_data, sample_few_shot

    with pytest.raises(ValueError, match=r"shots"):
        sample_few_shot(load_image_classification_data(train_dir=shapes_dir)["train"], 50)


def test_single_class_dataset(tiny_clip_path, shapes_dir, tmp_path):
    data = tmp_path / "one-class"
    shutil.copytree(Path(shapes_dir) / "red circle", data / "red circle")
    helpers.fewshot_error(_args(tiny_clip_path, str(data), tmp_path), r"class.*at least 2|2 classes")


def test_model_without_image_and_text_towers(tiny_clip_path, shapes_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

    folder = tmp_path / "vision-only"
    CLIPVisionModel(CLIPModel.from_pretrained(tiny_clip_path).config.vision_config).save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny_clip_path).save_pretrained(folder)
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--model_name_or_path", str(folder))
    helpers.fewshot_error(argv, r"CLIPVisionModel from .* has no vision / text tower with a pooled embedding \(it has")


def test_world_size_without_processes_fails_loudly(tiny_clip_path, shapes_dir, tmp_path):
    argv = _args(tiny_clip_path, shapes_dir, tmp_path)
    helpers.fewshot_error(argv, r"WORLD_SIZE=2 but Accelerate sees one process", env={"WORLD_SIZE": "2"})


# -----------------------------------------------------------------------------
# The toolkit's training code, in-process


def test_learning_rate_schedule_is_coops():
    """Constant 1e-5 warm-up epoch, then the cosine over the whole run (CoOp's ConstantWarmupScheduler)."""
    from peft_clip_adapter.fewshot.recipe import scheduled_learning_rate

    # 2 steps per epoch, 8 in all, warm-up = one epoch.
    rates = [scheduled_learning_rate(step, peak=0.002, warmup_steps=2, total_steps=8) for step in range(8)]
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


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"views": 0}, r"LoopSettings.views must be a whole number >= 1 .*got 0"),
        ({"checkpointing_steps": "often"}, r"LoopSettings.checkpointing_steps must be .*got 'often'"),
        ({"learning_rate": 0.0}, r"LoopSettings.learning_rate must be > 0, got 0.0"),
    ],
)
def test_loop_settings_refuse_bad_values(bad, message):
    from peft_clip_adapter.fewshot.training import LoopSettings

    with pytest.raises(ValueError, match=message):
        LoopSettings(**{"num_train_epochs": 2, "views": 1, "learning_rate": 0.1, **bad})


def test_a_loss_that_does_not_move_is_reported(caplog):
    from peft_clip_adapter.fewshot.training import warn_if_loss_stalled

    caplog.set_level("WARNING")
    assert not warn_if_loss_stalled([1.39, 1.2, 1.1, 1.0, 0.9], num_classes=4)
    assert "has not moved" not in caplog.text
    assert warn_if_loss_stalled([1.386294] * 5, num_classes=4)
    assert "The training loss has not moved in the first 5 epochs" in caplog.text
    assert "ln(4 classes) = 1.3863" in caplog.text


def test_card_results_name_local_folders_not_paths(tmp_path):
    from peft_clip_adapter.fewshot.training import card_results

    model_dir = tmp_path / "my-clip"
    model_dir.mkdir()
    results = {"dataset": "hub/eurosat", "eval_accuracy": 0.8, "zero_shot_accuracy": 0.5, "num_eval_images": 40}
    card = card_results({**results, "hyperparameter_search": None}, str(model_dir), shots=4, ratio=0.2)
    assert card == {
        "base_model": "my-clip (local folder)",
        "dataset": "hub/eurosat",
        "shots": 4,
        "ratio": 0.2,
        "accuracy": 0.8,
        "zero_shot_accuracy": 0.5,
        "num_eval_images": 40,
    }
    search = {"summary": "ratio 0.4 of [0.2, 0.4]"}
    assert (
        card_results({**results, "hyperparameter_search": search}, "org/clip")["hyperparameter_search"]
        == (search["summary"])
    )


def test_many_classes_are_summarised(caplog):
    from peft_clip_adapter.fewshot.training import log_per_class

    names = [f"class {index}" for index in range(30)]
    zero_shot = [0.5] * 30
    adapter = [index / 30 for index in range(29)] + [None]
    caplog.set_level(logging.INFO)
    log_per_class(names, zero_shot, adapter)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert lines[0] == (
        "Per class (30 classes; every one in all_results.json): 13 better than zero-shot, 15 worse, "
        "1 unchanged, 1 not evaluated"
    )
    assert lines[1].startswith("  weakest:   class 0 0.0% (zero-shot 50.0%), class 1 3.3% (zero-shot 50.0%)")
    assert lines[2].startswith("  strongest: class 28 93.3% (zero-shot 50.0%), class 27 90.0%")


def test_a_full_disk_leaves_no_partial_results_and_names_the_file(tmp_path):
    """The plot is larger than the limit: all_results.json is written whole, the plot not at all."""
    script = f"""
        import resource, signal
        from peft_clip_adapter.fewshot.training import save_results

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        history = {{"train_loss_per_epoch": [1.0, 0.5], "eval_accuracy_per_epoch": {{"2": 0.5}}}}
        save_results({str(tmp_path)!r}, {{**history, "zero_shot_accuracy": 0.25}})
    """
    finished = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert finished.returncode == 1
    assert (
        f"Could not write {tmp_path / 'training_curves.png'}: File too large. Nothing was written" in finished.stderr
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["all_results.json"]  # no partial plot, no temporary
    assert json.loads((tmp_path / "all_results.json").read_text())["zero_shot_accuracy"] == 0.25


# -----------------------------------------------------------------------------
# The offline default


@pytest.mark.slow
def test_offline_default_beats_zero_shot(offline_cache_dir, tmp_path):
    """No model, no data: the pretrained micro-CLIP and the generated dusk-pairs task, with the paper's recipe."""
    run = helpers.run_fewshot(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(offline_cache_dir)])
    results = run.results
    assert "a micro-CLIP pretrained on generated captioned scenes" in run.log
    assert (results["shots"], results["ratio"], results["learning_rate"], results["views"]) == (16, 0.2, 2e-3, 10)
    assert (results["num_classes"], results["num_train_images"], results["num_eval_images"]) == (9, 144, 450)
    assert results["dataset"] == "offline-dusk-pairs" and len(results["train_loss_per_epoch"]) == 200
    assert results["zero_shot_accuracy"] >= 2 / 9  # a real zero-shot baseline: twice chance or more
    assert results["eval_accuracy"] >= results["zero_shot_accuracy"] + 0.10
    assert "has not moved" not in run.log
    for line in ("Zero-shot accuracy: ", "epoch 200: loss ", "CLIP-Adapter accuracy: ", "  yellow triangle   "):
        assert line in run.log  # the README's quick start shows these lines


def test_same_seed_same_adapter_on_a_first_and_a_later_run(tmp_path):
    """The first offline run builds its model and images (which reseeds torch); a later run reuses them."""
    quick_build = (
        "import peft_clip_adapter.testing.offline_default as offline\n"
        "from peft_clip_adapter.testing.microclip import PretrainingConfig\n"
        "offline.MICRO_CLIP_CONFIG = PretrainingConfig(steps=2, batch_size=16, pool_size=64)\n"
    )
    argv = ["--cache_dir", str(tmp_path / "cache"), "--num_train_epochs", "3"]
    first = helpers.run_fewshot([*argv, "--output_dir", str(tmp_path / "first")], prelude=quick_build).results
    later = helpers.run_fewshot([*argv, "--output_dir", str(tmp_path / "later")], prelude=quick_build).results
    expected, actual = helpers.adapter_tensors(tmp_path / "first"), helpers.adapter_tensors(tmp_path / "later")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert first["train_loss_per_epoch"] == later["train_loss_per_epoch"]
