"""A griffe extension for the API pages: read the package's docstrings as the Markdown they are meant to be.

- The docstrings title their doctests ``Example:`` (singular). Griffe's Google-style parser only knows
  ``Examples:`` and would render ``Example:`` as an admonition of plain Markdown, where doctest output
  such as ``x["a"]["b"]`` reads as a reference link. The heading is renamed before parsing, so the
  examples render as highlighted ``pycon`` code.
- A few docstrings use Sphinx roles (``:func:`load_image```), which Markdown would show verbatim; they
  become inline code.

The docstrings themselves stay as they are (they also serve ``help()`` and the doctests).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc):`~?(?P<target>[^`]+)`")


def to_markdown(docstring: str) -> str:
    """The docstring with ``Example:`` headings renamed and Sphinx roles turned into inline code.

    Example:
        >>> to_markdown("Uses :func:`load_image`.\\n\\nExample:\\n    >>> 1\\n")
        'Uses `load_image`.\\n\\nExamples:\\n    >>> 1\\n'
    """
    return _SPHINX_ROLE.sub(r"`\g<target>`", _EXAMPLE_HEADING.sub(r"\g<indent>Examples:", docstring))


class DocstringMarkup(griffe.Extension):
    """Apply ``to_markdown`` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
