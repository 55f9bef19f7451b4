"""A griffe extension for the API pages: read a docstring's ``Example:`` section as doctest examples.

The package's docstrings title their doctests ``Example:`` (singular). Griffe's Google-style parser only
knows ``Examples:`` and would render ``Example:`` as an admonition of plain Markdown, where doctest output
such as ``x["a"]["b"]`` reads as a reference link. Renaming the heading before parsing keeps the
docstrings as they are and renders their examples as highlighted ``pycon`` code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\g<indent>Examples:", obj.docstring.value)
