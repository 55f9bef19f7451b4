"""Dataset loading, hold-out, k-shot sampling, image reading and transforms of peft_clip_adapter.fewshot.data."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from peft_clip_adapter.fewshot.data import (
    build_eval_transform,
    build_train_transform,
    check_columns,
    class_names,
    hold_out_validation,
    load_image,
    load_image_classification_data,
    prepare_image_classification_data,
    sample_few_shot,
    to_rgb,
)
from peft_clip_adapter.fewshot.inputs.transforms import _random_resized_crop_box
from peft_clip_adapter.testing.tiny_models import SHAPE_CLASSES, write_shapes_dataset

SHAPE_NAMES = sorted(SHAPE_CLASSES)  # imagefolder sorts the class folders


def labelled(counts: dict[str, int], *, class_label: bool = True) -> datasets.Dataset:
    """A dataset with an ``idx`` column (row number), a dummy image path and ``counts[name]`` rows per class."""
    labels = [label for label, count in enumerate(counts.values()) for _ in range(count)]
    labels = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]  # classes interleaved
    features = datasets.Features(
        {
            "idx": datasets.Value("int64"),
            "image": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(counts)) if class_label else datasets.Value("int64"),
        }
    )
    rows = {"idx": list(range(len(labels))), "image": [f"{i}.png" for i in range(len(labels))], "label": labels}
    return datasets.Dataset.from_dict(rows, features=features)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def test_train_dir_holds_out_a_stratified_seeded_validation_split(shapes_dir):
    splits = load_image_classification_data(train_dir=shapes_dir, validation_fraction=0.2, seed=0)
    assert sorted(splits) == ["train", "validation"]
    assert splits["train"].features["label"].names == SHAPE_NAMES
    # 12 images per class: round(0.2 * 12) = 2 held out per class.
    assert Counter(splits["validation"]["label"]) == dict.fromkeys(range(4), 2)
    assert Counter(splits["train"]["label"]) == dict.fromkeys(range(4), 10)
    train_files = {image.filename for image in splits["train"]["image"]}
    validation_files = {image.filename for image in splits["validation"]["image"]}
    assert not train_files & validation_files and len(train_files | validation_files) == 48

    again = load_image_classification_data(train_dir=shapes_dir, validation_fraction=0.2, seed=0)
    other = load_image_classification_data(train_dir=shapes_dir, validation_fraction=0.2, seed=1)
    assert {image.filename for image in again["validation"]["image"]} == validation_files
    assert {image.filename for image in other["validation"]["image"]} != validation_files


def test_validation_dir_is_used_with_the_same_class_ids(tmp_path):
    train = write_shapes_dataset(tmp_path / "train", images_per_class=3)
    # The validation folder lacks a class: ids must still follow the training folder's class list.
    validation = write_shapes_dataset(tmp_path / "val", images_per_class=2, classes=["red circle", "yellow cross"])
    splits = load_image_classification_data(train_dir=train, validation_dir=validation)
    assert splits.num_rows == {"train": 12, "validation": 4}
    assert splits["validation"].features["label"].names == SHAPE_NAMES
    assert sorted(splits["validation"]["label"]) == [2, 2, 3, 3]


def test_dataset_name_loads_a_local_dataset_folder(shapes_dir):
    splits = load_image_classification_data(dataset_name=shapes_dir, validation_fraction=0.25)
    assert splits.num_rows == {"train": 36, "validation": 12}


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_name_reads_a_save_to_disk_folder(shapes_dir, tmp_path, as_dict):
    # load_dataset refuses a saved Dataset ("use load_from_disk"), which a command line cannot call.
    saved = datasets.load_dataset("imagefolder", data_dir=shapes_dir, split="train")
    saved = saved.cast_column("label", datasets.Value("int64"))  # integer labels, no ClassLabel
    (datasets.DatasetDict({"train": saved}) if as_dict else saved).save_to_disk(tmp_path / "saved")
    splits = load_image_classification_data(dataset_name=str(tmp_path / "saved"), validation_fraction=0.25)
    assert splits.num_rows == {"train": 36, "validation": 12}
    assert splits["train"].features["label"] == datasets.Value("int64")
    assert sorted(Counter(splits["validation"]["label"]).values()) == [3, 3, 3, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one data source"),
        ({"dataset_name": "x", "train_dir": "y"}, "exactly one data source"),
        ({"dataset_name": "x", "validation_dir": "y"}, "validation_dir goes with train_dir"),
        ({"train_dir": "/no/such/folder"}, r"train_dir='/no/such/folder' is not a folder"),
    ],
)
def test_bad_sources_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_image_classification_data(**kwargs)


def test_train_and_validation_folders_at_different_depths(tmp_path):
    # The imagefolder builder drops labels when files sit at different depths; each folder loads alone.
    train = write_shapes_dataset(tmp_path / "data" / "eurosat" / "train", images_per_class=3)
    validation = write_shapes_dataset(tmp_path / "val", images_per_class=1, classes=["yellow cross", "blue triangle"])
    splits = load_image_classification_data(train_dir=train, validation_dir=validation)
    assert splits["validation"].features["label"].names == SHAPE_NAMES
    names = splits["validation"].features["label"].names
    assert sorted(names[label] for label in splits["validation"]["label"]) == ["blue triangle", "yellow cross"]


def test_validation_class_missing_from_training_is_refused(tmp_path):
    train = write_shapes_dataset(tmp_path / "train", images_per_class=2, classes=["red circle", "blue triangle"])
    validation = write_shapes_dataset(tmp_path / "val", images_per_class=1, classes=["red circle", "green square"])
    with pytest.raises(ValueError, match=r"validation folder has classes \['green square'\] that the training"):
        load_image_classification_data(train_dir=train, validation_dir=validation)


def test_empty_and_single_class_folders_are_refused(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"train_dir=.*empty' holds no image files"):
        load_image_classification_data(train_dir=tmp_path / "empty")
    single = write_shapes_dataset(tmp_path / "single", images_per_class=3, classes=["red circle"])
    with pytest.raises(ValueError, match=r"single' gives no class labels.*at least 2 class sub-folders"):
        load_image_classification_data(train_dir=single)


def test_images_without_class_folders_have_no_label_column(tmp_path):
    for index in range(3):
        random_image(8, 8, index).save(tmp_path / f"{index}.png")
    with pytest.raises(ValueError, match=r"gives no class labels: images are read as <folder>/<class name>/<image>"):
        load_image_classification_data(train_dir=tmp_path)


def test_missing_columns_list_the_columns_there_are(shapes_dir):
    with pytest.raises(ValueError, match=r"Image column 'img' not found; .* columns \['image', 'label'\].*"):
        load_image_classification_data(train_dir=shapes_dir, image_column="img")
    with pytest.raises(ValueError, match=r"Label column 'target' not found; .* \['image', 'label'\]"):
        load_image_classification_data(train_dir=shapes_dir, label_column="target")


@pytest.mark.parametrize("class_label", [True, False])
def test_in_memory_datasets_with_class_label_or_integer_labels(class_label):
    data = labelled({"cat": 10, "dog": 5}, class_label=class_label)
    splits = prepare_image_classification_data(data, validation_fraction=0.2, seed=0)
    assert Counter(splits["validation"]["label"]) == {0: 2, 1: 1}
    assert Counter(splits["train"]["label"]) == {0: 8, 1: 4}
    assert list(splits["train"]["idx"]) == sorted(splits["train"]["idx"])  # dataset order kept
    assert class_names(splits["train"]) == (["cat", "dog"] if class_label else ["0", "1"])


def test_string_labels_are_encoded_consistently_across_splits():
    train = datasets.Dataset.from_dict({"image": ["a", "b", "c", "d"], "label": ["dog", "cat", "dog", "cat"]})
    validation = datasets.Dataset.from_dict({"image": ["e"], "label": ["dog"]})
    splits = prepare_image_classification_data(datasets.DatasetDict({"train": train, "validation": validation}))
    assert splits["train"].features["label"].names == ["cat", "dog"]
    assert list(splits["train"]["label"]) == [1, 0, 1, 0]
    assert list(splits["validation"]["label"]) == [1]


def test_existing_validation_and_test_splits_are_kept_and_a_missing_train_split_is_refused():
    data = labelled({"cat": 4, "dog": 4})
    splits = prepare_image_classification_data(datasets.DatasetDict({"train": data, "validation": data, "test": data}))
    assert splits.num_rows == {"train": 8, "validation": 8, "test": 8}
    with pytest.raises(ValueError, match=r"no 'train' split; its splits are \['test', 'validation'\]"):
        prepare_image_classification_data(datasets.DatasetDict({"validation": data, "test": data}))


def test_one_class_and_float_labels_are_refused():
    with pytest.raises(ValueError, match=r"at least 2 classes.*has 1: \['cat'\]"):
        prepare_image_classification_data(labelled({"cat": 4, "dog": 0}))
    floats = datasets.Dataset.from_dict({"image": ["a", "b"], "label": [0.5, 1.5]})
    with pytest.raises(ValueError, match=r"Label column 'label' has type .*float.*ClassLabel, integers or strings"):
        check_columns(floats, "image", "label")


def test_hold_out_rounds_half_up_and_keeps_one_training_image_per_class():
    data = labelled({"a": 10, "b": 1, "c": 2})
    split = hold_out_validation(data, validation_fraction=0.25, seed=3)
    # a: 2.5 -> 3 held out; b: its only image stays in train; c: 0.5 -> 1.
    assert Counter(split["validation"]["label"]) == {0: 3, 2: 1}
    assert sorted([*split["train"]["idx"], *split["validation"]["idx"]]) == list(range(13))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_hold_out_fraction_must_be_inside_zero_one(fraction):
    with pytest.raises(ValueError, match=rf"validation_fraction must be in \(0, 1\), got {fraction}"):
        hold_out_validation(labelled({"a": 4, "b": 4}), validation_fraction=fraction)


def test_hold_out_needs_images_to_hold_out():
    with pytest.raises(ValueError, match=r"Too few images \(2\).*--validation_dir"):
        hold_out_validation(labelled({"a": 1, "b": 1}))


def test_class_names_and_bad_labels():
    assert class_names(labelled({"x": 1, "y": 2})) == ["x", "y"]
    assert class_names(datasets.Dataset.from_dict({"label": [3, 1]})) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match=r"negative label -1 .*filter"):
        class_names(datasets.Dataset.from_dict({"label": [0, -1, 1]}))
    with pytest.raises(ValueError, match=r"Label column 'y' not found; the dataset has columns \['label'\]"):
        class_names(datasets.Dataset.from_dict({"label": [0]}), "y")


# ----------------------------------------------------------------------------------------------------------------
# k-shot sampling


@pytest.mark.parametrize("class_label", [True, False])
def test_sample_few_shot_is_balanced_seeded_and_in_dataset_order(class_label):
    data = labelled({"a": 20, "b": 9, "c": 15}, class_label=class_label)
    first = sample_few_shot(data, 4, seed=7)
    assert Counter(first["label"]) == {0: 4, 1: 4, 2: 4}
    indices = list(first["idx"])
    assert indices == sorted(indices)
    assert all(data[i]["label"] == label for i, label in zip(indices, first["label"], strict=True))
    assert list(sample_few_shot(data, 4, seed=7)["idx"]) == indices
    assert list(sample_few_shot(data, 4, seed=8)["idx"]) != indices


def test_sample_few_shot_draws_each_class_independently():
    """A class's sample depends on its own rows only, so no other class, shard or process can change it."""
    data = labelled({"a": 20, "b": 9, "c": 15})
    rows_of = {label: [i for i, value in enumerate(data["label"]) if value == label] for label in range(3)}
    full = sample_few_shot(data, 3, seed=1)
    picked = {
        label: [i for i, value in zip(full["idx"], full["label"], strict=True) if value == label] for label in range(3)
    }
    without_b = data.filter(lambda row: row["label"] != 1)
    partial = sample_few_shot(without_b, 3, seed=1, allow_fewer=True)  # "b" now has 0 images
    assert sorted(partial["idx"]) == sorted(picked[0] + picked[2])
    assert all(set(picked[label]) <= set(rows_of[label]) for label in range(3))


def test_classes_with_too_few_images_are_named_unless_allowed():
    data = labelled({"a": 5, "b": 2, "c": 1})
    with pytest.raises(ValueError, match=r"needs 4 images per class, but class 'b' has 2, class 'c' has 1\."):
        sample_few_shot(data, 4)
    relaxed = sample_few_shot(data, 4, allow_fewer=True)
    assert Counter(relaxed["label"]) == {0: 4, 1: 2, 2: 1}


def test_a_class_label_with_no_images_counts_as_zero():
    with pytest.raises(ValueError, match=r"class 'empty' has 0"):
        sample_few_shot(labelled({"a": 3, "empty": 0, "b": 3}), 1)


def test_sample_few_shot_on_an_image_folder(shapes_dir):
    train = datasets.load_dataset("imagefolder", data_dir=shapes_dir, split="train")
    sample = sample_few_shot(train, 2, seed=0)
    assert Counter(sample["label"]) == dict.fromkeys(range(4), 2)
    assert isinstance(sample[0]["image"], Image.Image)


@pytest.mark.parametrize("shots", [0, -1, 1.5, True, "4"])
def test_shots_must_be_a_positive_integer(shots):
    with pytest.raises(ValueError, match=r"shots must be an integer >= 1"):
        sample_few_shot(labelled({"a": 3, "b": 3}), shots)


def test_sampling_seed_and_label_column_are_checked():
    data = labelled({"a": 3, "b": 3})
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        sample_few_shot(data, 1, seed=-1)
    with pytest.raises(
        ValueError, match=r"Label column 'y' not found; the dataset has columns \['idx', 'image', 'label'\]"
    ):
        sample_few_shot(data, 1, label_column="y")
    with pytest.raises(ValueError, match=r"class_encode_column\('image'\)"):
        sample_few_shot(data, 1, label_column="image")


# ----------------------------------------------------------------------------------------------------------------
# Reading images


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 255, 64))
    # out = alpha * colour + (1 - alpha) * 255 per channel, alpha = 64 / 255.
    expected = tuple(round(64 / 255 * value + (1 - 64 / 255) * 255) for value in (0, 0, 255))
    assert all(abs(a - b) <= 1 for a, b in zip(to_rgb(rgba).getpixel((1, 1)), expected, strict=True))


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 7, (7, 7, 7)),
        ("1", 1, (255, 255, 255)),
        ("LA", (9, 255), (9, 9, 9)),
        ("LA", (9, 0), (255, 255, 255)),
        ("P", 0, (0, 0, 0)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("I;16", 257 * 100, (100, 100, 100)),
        ("I", 65535, (255, 255, 255)),
        ("I", 200, (200, 200, 200)),
        ("F", 0.5, (128, 128, 128)),
        ("F", 64.0, (64, 64, 64)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_every_mode_becomes_rgb(mode, value, expected):
    rgb = to_rgb(Image.new(mode, (3, 2), value))
    assert rgb.mode == "RGB" and rgb.size == (3, 2)
    assert rgb.getpixel((2, 1)) == expected


def test_palette_with_a_transparent_colour_is_composited_on_white():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert [to_rgb(palette).getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (40, 50, 60)]


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_load_image_reads_every_form_a_dataset_gives(tmp_path):
    image = random_image(5, 4).convert("RGBA")
    path = tmp_path / "picture.png"
    image.save(path)
    expected = np.asarray(to_rgb(image))
    for value in (
        image,
        str(path),
        path,
        encoded(image),
        {"path": str(path), "bytes": None},
        {"path": None, "bytes": encoded(image)},
    ):
        loaded = load_image(value)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_load_image_reads_an_undecoded_dataset_column(shapes_dir):
    train = datasets.load_dataset("imagefolder", data_dir=shapes_dir, split="train")
    raw = train.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert set(raw) == {"path", "bytes"}
    np.testing.assert_array_equal(np.asarray(load_image(raw)), np.asarray(train[0]["image"].convert("RGB")))


def test_unreadable_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(encoded(random_image(64, 64))[:200])
    for path in (corrupt, truncated, tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=rf"Cannot read image file '{path}'"):
            load_image(str(path))
        with pytest.raises(ValueError, match=rf"Cannot read image file '{path}'"):
            load_image({"path": str(path), "bytes": None})
    with pytest.raises(ValueError, match=r"Cannot read image file 'in/zip.png'"):
        load_image({"path": "in/zip.png", "bytes": corrupt.read_bytes()})


def test_values_that_are_no_image_are_refused():
    with pytest.raises(ValueError, match=r"holds no image"):
        load_image({"path": None, "bytes": None})
    with pytest.raises(ValueError, match=r"Cannot read an image from a int; expected a PIL image"):
        load_image(3)


# ----------------------------------------------------------------------------------------------------------------
# Transforms

SIZES = [(48, 48), (64, 40), (40, 64), (33, 97), (20, 12)]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_eval_transform_equals_the_processor(tiny_processor, mode):
    transform = build_eval_transform(tiny_processor)  # the CLIPProcessor: its image processor is used
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed).convert(mode)
        expected = torch.as_tensor(np.asarray(tiny_processor(images=image).pixel_values[0]))
        pixels = transform(image)
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"size": {"height": 24, "width": 40}, "do_center_crop": False, "resample": 2},
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 24, "width": 28}},  # crop larger: padded
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 30}, "image_mean": [0.5] * 3},
    ],
)
def test_eval_transform_follows_other_processor_settings(settings):
    processor = CLIPImageProcessor(**settings)
    transform = build_eval_transform(processor)
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        expected = torch.as_tensor(np.asarray(processor(images=image).pixel_values[0]))
        torch.testing.assert_close(transform(image), expected, atol=1e-5, rtol=0)


def test_mean_and_std_come_from_the_processor():
    processor = CLIPImageProcessor(
        size={"height": 4, "width": 4}, do_center_crop=False, image_mean=[0.0] * 3, image_std=[1.0] * 3
    )
    image = random_image(4, 4)
    expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # [3, 4, 4]
    torch.testing.assert_close(build_eval_transform(processor)(image), expected)
    assert "mean=(0.0, 0.0, 0.0)" in build_eval_transform(processor).description


def test_descriptions_tell_settings_apart(tiny_processor):
    eval_transform = build_eval_transform(tiny_processor)
    assert eval_transform.description == build_eval_transform(tiny_processor).description
    train = {seed: build_train_transform(tiny_processor, seed=seed).description for seed in (0, 1)}
    assert len({eval_transform.description, *train.values()}) == 3
    assert build_train_transform(tiny_processor, flip_probability=0.0).description != train[0]


def test_train_transform_is_deterministic_in_seed_index_and_view(tiny_processor):
    image = random_image(60, 45)
    transform = build_train_transform(tiny_processor, seed=0)
    pixels = transform(image, index=2, view=1)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels, build_train_transform(tiny_processor, seed=0)(image, index=2, view=1))
    for other in (
        transform(image, index=2, view=2),
        transform(image, index=3, view=1),
        build_train_transform(tiny_processor, seed=1)(image, index=2, view=1),
    ):
        assert not torch.equal(pixels, other)


def test_train_transform_is_crop_resize_flip_then_the_processors_normalisation(tiny_processor):
    square = random_image(48, 48)
    # The whole image as the crop: the same bicubic resize to 32 px as the eval transform.
    whole = build_train_transform(tiny_processor, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_probability=0.0)
    torch.testing.assert_close(whole(square, index=5), build_eval_transform(tiny_processor)(square))
    # Same (seed, index, view) -> same crop; flipping always vs never mirrors it.
    never = build_train_transform(tiny_processor, flip_probability=0.0)(square, index=4, view=3)
    always = build_train_transform(tiny_processor, flip_probability=1.0)(square, index=4, view=3)
    assert torch.equal(always, never.flip(-1))


def test_random_resized_crop_boxes_stay_inside_the_image_and_the_ranges():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        top, left, height, width = _random_resized_crop_box(rng, 60, 80, (0.08, 1.0), (3 / 4, 4 / 3))
        assert top >= 0 and top + height <= 60 and left >= 0 and left + width <= 80
        assert 3 / 4 - 0.1 < width / height < 4 / 3 + 0.1  # rounding to whole pixels
        areas.append(height * width / (60 * 80))
    assert min(areas) > 0.07 and max(areas) <= 1.0 and np.std(areas) > 0.1
    # A strip no crop of the allowed ratios fits in falls back to the largest central crop.
    assert _random_resized_crop_box(rng, 10, 1000, (0.9, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"scale": (0.0, 1.0)}, r"scale must be \(low, high\) with 0 < low <= high <= 1"),
        ({"scale": (0.5, 0.2)}, r"scale must be"),
        ({"ratio": (4 / 3, 3 / 4)}, r"ratio must be \(low, high\) with 0 < low <= high"),
        ({"flip_probability": 1.5}, r"flip_probability must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_train_settings_are_refused(tiny_processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_train_transform(tiny_processor, **kwargs)


def test_bad_processors_and_indices_are_refused(tiny_processor):
    with pytest.raises(ValueError, match=r"no fixed size to random-crop to"):
        build_train_transform(CLIPImageProcessor(size={"shortest_edge": 32}, do_center_crop=False))
    with pytest.raises(ValueError, match=r"Unsupported image processor size .*'shortest_edge': n"):
        build_eval_transform(CLIPImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}))
    with pytest.raises(ValueError, match=r"str is not an image processor"):
        build_eval_transform("openai/clip-vit-base-patch16")
    with pytest.raises(ValueError, match=r"view must be an integer >= 0, got -1"):
        build_train_transform(tiny_processor)(random_image(8, 8), view=-1)


def test_transforms_read_image_files_and_name_broken_ones(tiny_processor, tmp_path):
    path = Path(tmp_path) / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    for transform in (build_eval_transform(tiny_processor), build_train_transform(tiny_processor)):
        with pytest.raises(ValueError, match=r"Cannot read image file '.*broken.jpg'"):
            transform(str(path))
