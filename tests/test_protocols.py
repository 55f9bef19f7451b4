"""Base-to-novel, cross-domain and CoOp split files: deterministic splits, the harmonic mean, refusals by name."""

from __future__ import annotations

import json

import datasets
import pytest

from peft_clip_adapter.fewshot.protocols import base2novel
from peft_clip_adapter.fewshot.protocols.coop_splits import find_split_file, read_coop_split
from peft_clip_adapter.fewshot.protocols.cross_domain import target_class_indices


def test_base2novel_split_is_sorted_and_deterministic():
    names = ["zebra", "ant", "cat", "bee", "dog"]
    assert base2novel.split_classes(names) == (["ant", "bee", "cat"], ["dog", "zebra"])
    # Any order of the same names gives the same halves.
    assert base2novel.split_classes(list(reversed(names))) == base2novel.split_classes(names)
    assert base2novel.split_classes(["b", "a"]) == (["a"], ["b"])
    with pytest.raises(ValueError, match=r"base2novel needs at least 2 classes .* got 1: \['cat'\]"):
        base2novel.split_classes(["cat"])


@pytest.mark.parametrize(("base", "novel"), [(80.0, 60.0), (100.0, 0.0), (50.0, 50.0), (0.0, 0.0)])
def test_harmonic_mean_is_2bn_over_b_plus_n(base, novel):
    expected = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
    assert base2novel.harmonic_mean(base, novel) == expected
    assert base2novel.harmonic_mean(80.0, 60.0) == pytest.approx(9600 / 140)


def test_keep_classes_relabels_in_the_kept_order():
    names = ["ant", "bee", "cat"]
    features = datasets.Features({"label": datasets.ClassLabel(names=names), "x": datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict({"label": [0, 2, 1, 2], "x": [10, 11, 12, 13]}, features=features)
    kept = base2novel.keep_classes(dataset, ["cat", "ant"], names)
    assert kept["x"] == [10, 11, 13] and kept["label"] == [1, 0, 0]
    assert kept.features["label"].names == ["cat", "ant"]
    with pytest.raises(ValueError, match=r"Classes \['emu'\] are not among"):
        base2novel.keep_classes(dataset, ["emu"], names)


def test_cross_domain_maps_targets_and_refuses_other_names():
    assert target_class_indices(["a", "b", "c"], ["c", "a"], "t") == [2, 0]
    with pytest.raises(ValueError, match=r"target 'held-out-pairs' has class names the source lacks: \['red cross'\]"):
        target_class_indices(["red circle"], ["red circle", "red cross"], "held-out-pairs")


def _split_folder(tmp_path, missing: int = 0):
    images = tmp_path / "ds" / "images"
    entries = {"train": [], "val": [], "test": []}
    for index, (part, label, name) in enumerate(
        [("train", 0, "annual crop"), ("train", 1, "forest"), ("val", 0, "annual crop"), ("test", 1, "forest")]
    ):
        path = f"{name}/{index}.jpg"
        entries[part].append([path, label, name])
        (images / name).mkdir(parents=True, exist_ok=True)
        (images / path).write_bytes(b"x")
    for index in range(missing):
        entries["test"].append([f"forest/gone{index}.jpg", 1, "forest"])
    (tmp_path / "ds" / "split_zhou_Test.json").write_text(json.dumps(entries))
    return tmp_path / "ds"


def test_a_coop_split_file_is_read_as_it_is(tmp_path):
    folder = _split_folder(tmp_path)
    train, test, names = read_coop_split(find_split_file(folder))
    assert names == ["annual crop", "forest"]
    assert len(train) == 2 and len(test) == 1 and train["label"] == [0, 1]
    assert train.features["label"].names == names
    assert find_split_file(tmp_path) is None


def test_a_split_file_naming_missing_images_is_refused_naming_the_first_few(tmp_path):
    folder = _split_folder(tmp_path, missing=5)
    with pytest.raises(
        ValueError, match=r"names 5 images that do not exist, e.g. \[.*gone0.jpg', .*gone2.jpg'\]"
    ) as error:
        read_coop_split(find_split_file(folder))
    assert "gone3" not in str(error.value)
