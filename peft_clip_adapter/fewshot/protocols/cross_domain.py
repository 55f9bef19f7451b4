"""Cross-domain transfer: train on a source dataset, test on targets that share its class names.

ImageNet's variants (V2, Sketch, -A, -R) keep ImageNet's names; -A and -R keep 200 of its classes, so a target
may hold a subset of the source's classes and is then classified among those (as CoOp does).
"""

from __future__ import annotations


def target_class_indices(source_names: list[str], target_names: list[str], target: str) -> list[int]:
    """For each of the target's classes, its index among the source's; the target is named in errors.

    Raises ``ValueError`` for a target class the source does not have (the first few are named).

    Example:
        >>> target_class_indices(["cat", "dog", "emu"], ["dog", "emu"], "zoo-sketch")
        [1, 2]
    """
    missing = [name for name in target_names if name not in source_names]
    if missing:
        raise ValueError(
            f"cross-domain target {target!r} has class names the source lacks: {missing[:5]} "
            f"({len(missing)} of {len(target_names)}); its classes must be the source's (or a subset of them)."
        )
    return [source_names.index(name) for name in target_names]
