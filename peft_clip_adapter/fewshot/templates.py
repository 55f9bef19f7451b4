"""Prompt templates: the per-dataset ones of the CLIP-Adapter reference code, and an ensemble.

A template is a format string with one ``{}`` for the class name, or any callable ``str -> str``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

Template = Union[str, Callable[[str], str]]

#: One template per dataset, as used by the paper's reference code (the CoOp dataset keys).
DATASET_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}

#: The template for datasets without an entry above.
DEFAULT_TEMPLATE = "a photo of a {}."

#: A seven-prompt ImageNet ensemble (from the CLIP authors' prompt selection) popular with peers.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def templates_for(name: str) -> list[str]:
    """Templates by name: a dataset key of ``DATASET_TEMPLATES``, ``"ensemble"`` or ``"default"``.

    Args:
        name: A key of ``DATASET_TEMPLATES`` (``"eurosat"``, ``"dtd"``, ...), ``"ensemble"`` or ``"default"``.

    Returns:
        A new list of template strings, each with one ``{}``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example:
        >>> templates_for("eurosat")
        ['a centered satellite photo of {}.']
        >>> len(templates_for("ensemble"))
        7
    """
    if name == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    if name == "default":
        return [DEFAULT_TEMPLATE]
    if name not in DATASET_TEMPLATES:
        known = ["default", "ensemble", *sorted(DATASET_TEMPLATES)]
        raise ValueError(f"Unknown template set {name!r}; choose one of {known} or pass template strings.")
    return [DATASET_TEMPLATES[name]]


def clean_classname(name: str) -> str:
    """Class names as the reference code writes them in prompts: underscores become spaces.

    Args:
        name: A class name, e.g. a folder name.

    Returns:
        ``name`` with every ``_`` replaced by a space and surrounding whitespace stripped.

    Example:
        >>> clean_classname("Annual_Crop")
        'Annual Crop'
    """
    return name.replace("_", " ").strip()


def fill_template(template: Template, classname: str) -> str:
    """One prompt: ``template`` applied to ``classname``.

    Args:
        template: A string with one ``{}``, or a callable ``classname -> prompt``.
        classname: The class name to put in (used as given; see ``clean_classname``).

    Returns:
        The prompt.

    Raises:
        ValueError: if a string template has no ``{}`` placeholder, or other fields (a second ``{}``,
            ``{name}``, an unpaired brace) that ``str.format`` cannot fill with the class name alone.

    Example:
        >>> fill_template("{} texture.", "banded")
        'banded texture.'
    """
    if callable(template):
        return template(classname)
    if "{}" not in template:
        raise ValueError(f"Template {template!r} has no '{{}}' placeholder for the class name.")
    try:
        return template.format(classname)
    except (IndexError, KeyError, ValueError) as error:  # str.format's errors say nothing about templates
        raise ValueError(
            f"Template {template!r} must hold exactly one '{{}}' for the class name and no other fields "
            f"(write literal braces as '{{{{' and '}}}}'); str.format said: {error}"
        ) from error


def as_template_list(templates: Union[Template, Sequence[Template]]) -> list[Template]:
    """Normalise one template, or several, into a non-empty list.

    Args:
        templates: One template (a string or a callable) or a sequence of them.

    Returns:
        A new list of the templates.

    Raises:
        ValueError: for an empty sequence.

    Example:
        >>> as_template_list("{} texture."), as_template_list(("a {}.", "the {}."))
        (['{} texture.'], ['a {}.', 'the {}.'])
        >>> as_template_list([])
        Traceback (most recent call last):
        ...
        ValueError: Pass at least one prompt template.
    """
    if isinstance(templates, str) or callable(templates):
        return [templates]
    result = list(templates)
    if not result:
        raise ValueError("Pass at least one prompt template.")
    return result
