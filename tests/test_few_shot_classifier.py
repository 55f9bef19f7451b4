"""``FewShotClassifier``: the trained classifier travels with the adapter and predicts what the trainer evaluated."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model
from PIL import Image
from transformers import CLIPModel

from peft_clip_adapter import CLIPAdapterConfig, FewShotClassifier, load_image_classification_data

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture


snippets = helpers.load_module(Path(__file__).with_name("docs_snippets.py"), "docs_snippets")
CLASSES = ["blue triangle", "green square", "red circle", "yellow cross"]
# peft looks up the (offline, unreachable) base config to see whether embeddings were resized; they never are.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


@pytest.fixture
def classifier(tiny_clip, tiny_processor) -> FewShotClassifier:
    model = get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both", ratio=0.6))
    with torch.no_grad():  # a trained-looking adapter, so that it changes the scores
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(parameter.numel()))
    return FewShotClassifier(model, tiny_processor, CLASSES, ["a photo of a {}.", "itap of a {}."])


@pytest.mark.parametrize("model_path", ["tiny_clip_path", "siglip2_path"])  # SigLIP 2 NaFlex: its processor's inputs
def test_predictions_equal_the_trainers_eval_predictions(model_path, shapes_dir, tmp_path, request):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from peft_clip_adapter.fewshot.features import FeatureCache
    from peft_clip_adapter.fewshot.training import evaluate

    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05)
    argv = helpers.trainer_args(request.getfixturevalue(model_path), shapes_dir, tmp_path, **flags, adapt="both")
    results = helpers.run_fewshot([*argv, "--templates", "ensemble"]).results

    classifier = FewShotClassifier.from_pretrained(tmp_path / "out")  # the base model named in its config
    assert classifier.head.sigmoid_scores == (model_path == "siglip2_path")  # SigLIP's scores are sigmoids
    heldout = load_image_classification_data(train_dir=shapes_dir, seed=0)["validation"]
    predictions = classifier(list(heldout["image"]))
    # The trainer's evaluation of the saved adapter, on the eval features the run cached.
    cache = FeatureCache(tmp_path / "cache" / "features")
    eval_set = cache.load_or_extract(classifier.model, heldout, classifier._transform)
    assert cache.last_hit
    rows = DataLoader(TensorDataset(torch.arange(len(heldout))), batch_size=3)
    trained = evaluate(classifier.head, eval_set, rows, Accelerator(cpu=True))

    assert classifier.class_names == CLASSES and classifier.templates == results["templates"]
    ids = [CLASSES.index(ranked[0]["label"]) for ranked in predictions]
    assert ids == trained["predictions"] and len(ids) == results["num_eval_images"] == 8
    accuracy = sum(i == label for i, label in zip(ids, heldout["label"], strict=True)) / len(ids)
    assert accuracy == results["eval_accuracy"] == trained["accuracy"]
    saved = json.loads((tmp_path / "out" / "class_prompts.json").read_text())
    assert saved == {"class_names": CLASSES, "templates": results["templates"]}


def test_output_is_sorted_like_the_zero_shot_pipeline(classifier):
    image = Image.new("RGB", (40, 30), "red")
    ranked = classifier(image)
    scores = classifier.scores(classifier.logits([image]))[0].tolist()  # [C]
    expected = sorted(zip(scores, CLASSES, strict=True), key=lambda pair: -pair[0])
    assert ranked == [{"score": score, "label": label} for score, label in expected]
    assert sum(row["score"] for row in ranked) == pytest.approx(1.0)
    # A batch of two gives the same ranking (its scores may differ in the last float bits).
    for batch, top_k in (([image, image], 2), ((image,), 10)):  # 10: more than there are classes, all of them
        for row in classifier(batch, top_k=top_k):
            assert [entry["label"] for entry in row] == [entry["label"] for entry in ranked[:top_k]]
            assert [entry["score"] for entry in row] == pytest.approx([entry["score"] for entry in ranked[:top_k]])


def test_the_adapter_changes_the_scores_and_ties_keep_the_class_order(classifier, tiny_clip, tiny_processor):
    image = Image.new("RGB", (40, 30), "green")
    zero_shot = FewShotClassifier(CLIPModel.from_pretrained(tiny_clip.name_or_path), tiny_processor, CLASSES)
    assert classifier(image) != zero_shot(image)
    tied = FewShotClassifier(zero_shot.model, tiny_processor, ["a", "b", "c"], "{}")
    tied.scores = lambda logits: torch.tensor([[0.25, 0.5, 0.25]])
    assert [row["label"] for row in tied(image)] == ["b", "a", "c"]


def test_round_trip_through_a_folder_keeps_the_predictions(classifier, tmp_path):
    classifier.save_pretrained(tmp_path / "saved")
    files = sorted(path.name for path in (tmp_path / "saved").iterdir())
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
        "class_prompts.json",
    ]
    loaded = FewShotClassifier.from_pretrained(tmp_path / "saved")
    image = Image.new("RGB", (50, 50), "blue")
    torch.testing.assert_close(loaded.logits([image]), classifier.logits([image]), rtol=0, atol=0)
    assert loaded.templates == classifier.templates


def test_push_then_pull_by_hub_id_with_the_two_line_card(classifier, tiny_clip_path, tmp_path):
    classifier.model.peft_config["default"].base_model_name_or_path = "openai/clip-vit-base-patch16"
    with snippets.offline_hub(tmp_path / "hub", Path(tiny_clip_path)) as hub:
        classifier.push_to_hub("me/shapes")
        assert hub.uploads[-1] == (
            "me/shapes",
            [
                "README.md",
                "adapter_config.json",
                "adapter_manifest.json",
                "adapter_model.safetensors",
                "class_prompts.json",
            ],
        )
        pulled = FewShotClassifier.from_pretrained("me/shapes")  # base model from the adapter config
        image = Image.new("RGB", (50, 50), "yellow")
        assert pulled(image) == classifier(image)
        card = ModelCard.load("me/shapes")
    assert card.data.widget == [{"candidate_labels": ", ".join(CLASSES), "example_title": "The adapter's classes"}]
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    usage = card.text.split("```python\n")[1].split("```")[0]
    assert usage == (
        "from peft_clip_adapter import FewShotClassifier  # pip install peft-clip-adapter\n\n"
        'classifier = FewShotClassifier.from_pretrained("me/shapes")\n'
        'predictions = classifier("image.jpg")  # [{"score": ..., "label": ...}, ...], best first\n'
        f"# 4 classes: {CLASSES!r} (classifier.class_names)\n"
    )


def test_a_base_model_passed_in_replaces_the_recorded_one(classifier, tiny_clip_path, tiny_processor, tmp_path):
    classifier.model.peft_config["default"].base_model_name_or_path = "/nowhere/clip"  # e.g. another machine's
    classifier.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"does not name a base model this machine can load .*'/nowhere/clip'"):
        FewShotClassifier.from_pretrained(tmp_path / "saved")
    image = Image.new("RGB", (50, 50), "red")
    by_path = FewShotClassifier.from_pretrained(tmp_path / "saved", base_model=tiny_clip_path)
    by_model = FewShotClassifier.from_pretrained(
        tmp_path / "saved", base_model=CLIPModel.from_pretrained(tiny_clip_path), processor=tiny_processor
    )
    assert by_path(image) == by_model(image) == classifier(image)


def test_loading_wraps_the_model_without_peft_warnings(classifier, tmp_path):
    classifier.save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FewShotClassifier.from_pretrained(tmp_path / "saved")
    assert [str(warning.message) for warning in caught if "is_gradient_checkpointing" in str(warning.message)] == []


# -----------------------------------------------------------------------------
# Bad input


def test_folder_without_class_prompts(tiny_clip, tmp_path):
    get_peft_model(tiny_clip, CLIPAdapterConfig()).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"has no class_prompts\.json: the adapter was saved without its classes"):
        FewShotClassifier.from_pretrained(tmp_path / "plain")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", r"class_prompts\.json of .* is not valid JSON"),
        ('{"class_names": ["a", "b"]}', r"must hold \{\"class_names\": \[\.\.\.\], \"templates\": \[\.\.\.\]\}"),
        ('{"class_names": [], "templates": ["{}"]}', "two non-empty lists of strings"),
        ('{"class_names": ["a", 2], "templates": ["{}"]}', "two non-empty lists of strings"),
    ],
)
def test_malformed_class_prompts(classifier, tmp_path, content, match):
    classifier.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "class_prompts.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        FewShotClassifier.from_pretrained(tmp_path / "saved")


def test_bad_arguments(classifier, tiny_clip, tiny_processor, tmp_path):
    image = Image.new("RGB", (40, 30))
    for top_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"top_k must be a whole number >= 1 .*got {top_k!r}"):
            classifier(image, top_k=top_k)
    with pytest.raises(ValueError, match=r"templates must be strings with '\{\}' \(they are saved as JSON\)"):
        FewShotClassifier(classifier.model, tiny_processor, CLASSES, [str.upper])
    with pytest.raises(ValueError, match=r"Template 'a photo' has no '\{\}' placeholder"):
        FewShotClassifier(classifier.model, tiny_processor, CLASSES, "a photo")
    with pytest.raises(ValueError, match=r"batch_size=0 must be at least 1"):
        FewShotClassifier(classifier.model, tiny_processor, CLASSES, batch_size=0)
    with pytest.raises(ValueError, match=r"classnames has duplicates \['red circle', 'red_circle'\]"):
        FewShotClassifier(classifier.model, tiny_processor, ["red circle", "red_circle"])
    with pytest.raises(ValueError, match=r"Cannot read image file 'missing\.png'"):
        classifier("missing.png")
    zero_shot = FewShotClassifier(tiny_clip, tiny_processor, CLASSES)
    with pytest.raises(
        ValueError, match=r"Only a classifier around a CLIP-Adapter PeftModel can be saved, got CLIPModel"
    ):
        zero_shot.save_pretrained(tmp_path / "zero-shot")
    assert not (tmp_path / "zero-shot").exists()
    config = copy.deepcopy(tiny_clip.config)
    config._name_or_path = ""
    nameless = CLIPModel(config)  # built from a bare config: no name_or_path to find a processor by
    classifier.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"The base model has no name_or_path to load its processor from"):
        FewShotClassifier.from_pretrained(tmp_path / "saved", base_model=nameless)
