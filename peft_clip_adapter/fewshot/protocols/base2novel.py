"""CoCoOp's base-to-novel protocol: train on the first half of the classes, test on both halves.

Classes are sorted by name; the first ``ceil(C / 2)`` are base, the rest novel (the split depends on the
names alone, so it is the same on every run and machine). Base and novel test images are each classified
among their own half's classes; ``harmonic_mean`` summarises the two.
"""

from __future__ import annotations

import math

import datasets


def split_classes(class_names: list[str]) -> tuple[list[str], list[str]]:
    """``(base, novel)``: the sorted names, first half (rounded up) base.

    Raises ``ValueError`` for fewer than 2 classes (a half would be empty).

    Example:
        >>> split_classes(["dog", "cat", "bird", "ant", "emu"])
        (['ant', 'bird', 'cat'], ['dog', 'emu'])
    """
    if len(class_names) < 2:
        raise ValueError(
            f"base2novel needs at least 2 classes (a base and a novel half), got {len(class_names)}: {class_names}."
        )
    ordered = sorted(class_names)
    half = math.ceil(len(ordered) / 2)
    return ordered[:half], ordered[half:]


def harmonic_mean(base: float, novel: float) -> float:
    """``2 * base * novel / (base + novel)``; 0 when both are 0.

    Example:
        >>> harmonic_mean(80.0, 60.0)
        68.57142857142857
    """
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def class_rows(labels: list[int], kept: list[str], class_names: list[str]) -> tuple[list[int], list[int]]:
    """``(rows, new labels)``: the rows whose class is in ``kept``, relabelled ``0..len(kept)-1`` in its order.

    ``class_names`` name the labels. Raises ``ValueError`` for a kept name they lack.

    Example:
        >>> class_rows([0, 2, 1, 2], ["c", "a"], ["a", "b", "c"])
        ([0, 1, 3], [1, 0, 0])
    """
    unknown = [name for name in kept if name not in class_names]
    if unknown:
        raise ValueError(f"Classes {unknown} are not among the dataset's {class_names}.")
    new_label = {class_names.index(name): index for index, name in enumerate(kept)}
    rows = [row for row, label in enumerate(labels) if label in new_label]
    return rows, [new_label[labels[row]] for row in rows]


def keep_classes(
    dataset: datasets.Dataset, kept: list[str], class_names: list[str], label_column: str = "label"
) -> datasets.Dataset:
    """The rows of ``dataset`` whose class is in ``kept``, relabelled as ``class_rows`` says, with those names."""
    rows, labels = class_rows(list(dataset[label_column]), kept, class_names)
    subset = dataset.select(rows).remove_columns(label_column).add_column(label_column, labels)
    return subset.cast_column(label_column, datasets.ClassLabel(names=list(kept)))
