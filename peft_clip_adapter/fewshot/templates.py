"""Prompt templates: the per-dataset ones of the CLIP-Adapter reference code, and an ensemble.

A template is a format string with one ``{}`` for the class name, or any callable ``str -> str``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

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
    """A new list of templates: a key of ``DATASET_TEMPLATES`` (``"eurosat"``, ...), ``"ensemble"`` or ``"default"``.

    Raises ``ValueError`` for an unknown name, listing the known ones.

    Example:
        >>> templates_for("eurosat")
        ['a centered satellite photo of {}.']
    """
    if name == "ensemble":
        return list(ENSEMBLE_TEMPLATES)
    if name == "default":
        return [DEFAULT_TEMPLATE]
    if name not in DATASET_TEMPLATES:
        known = ["default", "ensemble", *sorted(DATASET_TEMPLATES)]
        raise ValueError(f"Unknown template set {name!r}; choose one of {known} or pass template strings.")
    return [DATASET_TEMPLATES[name]]


def resolve_templates(values: Optional[Sequence[str]], dataset_hint: str = "") -> list[str]:
    """The templates a run asks for: one set's name, prompt strings with ``{}``, or none.

    With none, the set whose name ``dataset_hint`` (a dataset id or folder) contains is taken, else ``default``.

    Example:
        >>> resolve_templates(None, "data/EuroSAT/train"), resolve_templates(["a {} photo."])
        (['a centered satellite photo of {}.'], ['a {} photo.'])
    """
    if not values:
        hint = "".join(char for char in dataset_hint.lower() if char.isalnum())
        known = [name for name in DATASET_TEMPLATES if name.replace("_", "") in hint]
        values = [max(known, key=len)] if known else ["default"]
    return templates_for(values[0]) if len(values) == 1 and "{}" not in values[0] else list(values)


def clean_classname(name: str) -> str:
    """A class name as the reference code writes it in prompts: ``_`` -> space, whitespace stripped."""
    return name.replace("_", " ").strip()


def fill_template(template: Template, classname: str) -> str:
    """One prompt: ``template`` (a string with one ``{}``, or a callable) applied to ``classname`` as given.

    Raises ``ValueError`` for a string without ``{}``, or with fields ``str.format`` cannot fill with the class
    name alone (a second ``{}``, ``{name}``, an unpaired brace).
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
    """One template, or several, as a new non-empty list; ``ValueError`` for an empty sequence."""
    if isinstance(templates, str) or callable(templates):
        return [templates]
    result = list(templates)
    if not result:
        raise ValueError("Pass at least one prompt template.")
    return result
