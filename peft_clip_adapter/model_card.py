"""The model card written beside a saved CLIP-Adapter: metadata for the Hub and a usage snippet.

The card is the user's as much as ours. Our part of the text sits between two marker lines and is
rewritten on every save; whatever a user wrote outside it, and every metadata field we do not own, is
kept. Every string that comes from a user (paths, dataset names, class names, results) is escaped for
Markdown or quoted as a Python literal, so it can neither break the card nor add lines to its snippet.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import __version__ as peft_version

from peft_clip_adapter.config import CLIPAdapterConfig

TAGS = ("peft", "clip-adapter")
#: The file beside the adapter that holds the classifier's class names and prompt templates (JSON:
#: ``{"class_names": [...], "templates": [...]}``); ``FewShotClassifier`` reads it.
CLASS_PROMPTS_FILE = "class_prompts.json"
#: The lines that delimit our part of the card's text; everything outside them is the user's.
BEGIN_MARKER = "<!-- peft-clip-adapter: begin (rewritten on every save; edit outside these markers) -->"
END_MARKER = "<!-- peft-clip-adapter: end -->"
#: Our cards written before the markers existed start like this; such a text is ours entirely.
_UNMARKED_CARD_START = "# CLIP-Adapter\n\nA [CLIP-Adapter](https://arxiv.org/abs/2110.04544)"
#: The Hub task of an adapter, by what its base model classifies with prompts: images, or audio (CLAP).
IMAGE_TASK, AUDIO_TASK = "zero-shot-image-classification", "zero-shot-audio-classification"
#: Class names listed in the snippet's comment; longer lists are cut (``class_names`` holds them all).
SNIPPET_CLASSES = 20
#: What Markdown or HTML would read in a table cell or a line of text (underscores inside words are literal).
_MARKDOWN_SPECIALS = re.compile(r"([\\`*\[\]<>|&])")


@dataclass(frozen=True)
class CardFacts:
    """What a model card shows beyond the adapter, from whoever trained it (the few-shot toolkit, a script)."""

    #: Facts about training (dataset, shots, accuracy, ...), shown as a table.
    results: Optional[Mapping[str, Any]] = None
    #: The classes of the classifier saved beside the adapter: a ``FewShotClassifier`` snippet and the widget.
    class_names: Optional[Sequence[str]] = None
    #: That classifier's prompt templates.
    templates: Optional[Sequence[str]] = None
    #: The card's ``license``; by default the existing card's, else the base model's when it is known.
    license: Optional[str] = None


def render_model_card(
    config: CLIPAdapterConfig,
    *,
    base_model: Optional[str] = None,
    repo_id: Optional[str] = None,
    base_model_class: str = "CLIPModel",
    existing: Optional[ModelCard] = None,
    facts: CardFacts = CardFacts(),
    tags: Sequence[str] = (),
    branches: Sequence[str] = (),
) -> ModelCard:
    """The model card of an adapter saved with ``config``, or ``existing`` updated (its text outside our markers
    and its metadata kept). Its text shows the ``import peft_clip_adapter`` that loading needs.

    Args:
        base_model: Hub id or path of the base model (default: the config's). Only a Hub id reaches the
            metadata and the snippets; a local path is replaced by a placeholder.
        repo_id: Where the adapter lives, used in the snippets when it is a Hub id.
        base_model_class: The transformers class the peft snippet loads the base model with.
        facts: Results, classes, templates and licence to show.
        tags: More tags, e.g. the base model's ``model_tags``.
        branches: The base model's towers; audio without vision (CLAP) makes the card's task audio.
    """
    results, class_names, templates, license = facts.results, facts.class_names, facts.templates, facts.license
    base_model = base_model or config.base_model_name_or_path
    base_id = base_model if is_hub_id(base_model) else None
    adapter_id = repo_id if is_hub_id(repo_id) else None
    data = existing.data if existing is not None else ModelCardData()

    tags = {tag for tag in [*(data.tags or []), *tags] if not tag.startswith("base_model:")} | set(TAGS)
    if base_id:
        data.base_model = base_id
        tags.add(f"base_model:adapter:{base_id}")
    elif not is_hub_id(_as_text(data.base_model)):
        # The Hub refuses a README whose base_model is not a model id (a local path, ''): keep a user's id only.
        data.base_model = None
    data.tags = sorted(tags)
    data.library_name = "peft"
    if data.pipeline_tag in (None, "", IMAGE_TASK, AUDIO_TASK):  # ours to set; a user's other task is kept
        data.pipeline_tag = pipeline_tag(config, branches)
    data.license = license or data.license or base_model_license(base_model)
    dataset = str((results or {}).get("dataset") or "")
    if is_hub_id(dataset):
        data.datasets = sorted(set(data.datasets or []) | {dataset})
    if class_names:
        # The widget takes one comma-separated line, so names with commas or line breaks cannot be offered there.
        widget = [{"candidate_labels": ", ".join(class_names), "example_title": "The adapter's classes"}]
        data.widget = None if any("," in name or not name.isprintable() for name in class_names) else widget

    section = _our_section(
        config,
        base_model=base_model,
        base_id=base_id,
        adapter_id=adapter_id,
        base_model_class=base_model_class,
        results=results,
        class_names=class_names,
        templates=templates,
    )
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ text }}\n")
    card.text = _merge_text(existing.text if existing is not None else "", section)
    return card


def pipeline_tag(config: CLIPAdapterConfig, branches: Sequence[str] = ()) -> str:
    """The Hub task: zero-shot audio classification for an audio adapter or an audio-text model (CLAP), else
    zero-shot image classification."""
    audio = config.adapt == "audio" or ("audio" in branches and "vision" not in branches)
    return AUDIO_TASK if audio else IMAGE_TASK


def load_card(path: str | os.PathLike) -> Optional[ModelCard]:
    """The model card at ``path`` (a README without metadata loads with empty metadata), or ``None``."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        content = file.read()
    if content.lstrip().startswith("---"):
        return ModelCard(content)
    card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n")
    card.text = content
    return card


def base_model_license(base_model: Optional[str]) -> Optional[str]:
    """The ``license`` of the base model's own card (a local folder, or a Hub id in the cache), or ``None``."""
    if not base_model:
        return None
    readme: Any = os.path.join(base_model, "README.md")
    if not os.path.isdir(base_model) and is_hub_id(base_model):
        from huggingface_hub import try_to_load_from_cache

        readme = try_to_load_from_cache(base_model, "README.md")
    card = load_card(readme) if isinstance(readme, str) else None
    value = card.data.license if card is not None else None
    return str(value) if value else None


def is_hub_id(name: Optional[str]) -> bool:
    """Whether ``name`` can stand in the card as a Hub repository id (and is not a local path)."""
    if not name or not isinstance(name, str) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _our_section(
    config: CLIPAdapterConfig,
    *,
    base_model: Optional[str],
    base_id: Optional[str],
    adapter_id: Optional[str],
    base_model_class: str,
    results: Optional[Mapping[str, Any]],
    class_names: Optional[Sequence[str]],
    templates: Optional[Sequence[str]],
) -> str:
    adapter = adapter_id or "<this adapter's Hub id, or its folder>"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else "a contrastive dual encoder"
    lines = [
        BEGIN_MARKER,
        "# CLIP-Adapter",
        "",
        f"A [CLIP-Adapter](https://arxiv.org/abs/2110.04544) for {base_text}: a residual bottleneck MLP "
        "on the final pooled embedding of each adapted tower (the vector the model's contrastive head "
        "compares), `f' = ratio * ReLU(W2 ReLU(W1 f)) + (1 - ratio) * f`, trained with the class-name "
        "prompts as the classifier. Only the adapter is stored here.",
        "",
        "## Usage",
        "",
    ]
    if base_model and not base_id:
        # A local path means nothing on another machine (and would leak the trainer's file system).
        folder = os.path.basename(os.path.normpath(base_model))
        lines += [
            f"The base model was loaded from a local folder ({_markdown(folder)}), so this card cannot name it: "
            "pass its Hub id (or a local copy of it) where the snippets say `<base model id>`.",
            "",
        ]
    elif not base_model:
        lines += ["The base model is not recorded: pass its Hub id where the snippets say `<base model id>`.", ""]
    if not adapter_id:
        lines += [
            "Replace `<this adapter's Hub id, or its folder>` with the repository this folder is uploaded "
            "to, or with the folder's path.",
            "",
        ]
    base_argument = "" if base_id else ', base_model="<base model id>"'
    if class_names:
        shown = list(class_names[:SNIPPET_CLASSES])
        more = f" and {len(class_names) - len(shown)} more" if len(class_names) > len(shown) else ""
        lines += _code_block(
            [
                "from peft_clip_adapter import FewShotClassifier  # pip install peft-clip-adapter",
                "",
                f"classifier = FewShotClassifier.from_pretrained({_python(adapter)}{base_argument})",
                'predictions = classifier("image.jpg")  # [{"score": ..., "label": ...}, ...], best first',
                f"# {len(class_names)} classes: {shown!r}{more} (classifier.class_names)",
            ]
        )
        templates = list(templates or [])
        lines += [
            "",
            f"The classifier holds {len(class_names)} classes, prompted with {_plural(len(templates), 'template')} "
            f"({_markdown(json.dumps(templates, ensure_ascii=False))}), saved in `{CLASS_PROMPTS_FILE}`. "
            "With peft alone:",
            "",
        ]
    base_name = base_id or "<base model id>"
    lines += _code_block(
        [
            "import peft_clip_adapter  # registers CLIP_ADAPTER with peft; without it: KeyError: 'CLIP_ADAPTER'",
            "from peft import PeftModel",
            f"from transformers import AutoProcessor, {base_model_class}",
            "",
            f"base = {base_model_class}.from_pretrained({_python(base_name)})",
            f"model = PeftModel.from_pretrained(base, {_python(adapter)})",
            f"processor = AutoProcessor.from_pretrained({_python(base_name)})",
        ]
    )
    lines += [
        "",
        "## Adapter",
        "",
        "| setting | value |",
        "|---|---|",
        f"| adapted branch | {_markdown(config.adapt or sorted(config.target_modules or []))} |",
        f"| ratio (residual blend) | {_markdown(config.ratio)} |",
        f"| reduction | {_markdown(config.reduction)} |",
    ]
    if results:
        lines += ["", "## Training results", "", "| | |", "|---|---|"]
        lines += [f"| {_markdown(key)} | {_markdown(value)} |" for key, value in results.items()]
    lines += ["", "### Framework versions", "", f"- PEFT {peft_version}", END_MARKER]
    return "\n".join(lines)


def _merge_text(existing: str, section: str) -> str:
    """``existing`` with our section replaced (between the marker lines) or appended after the user's text."""
    lines = existing.splitlines()
    if BEGIN_MARKER in lines and END_MARKER in lines[lines.index(BEGIN_MARKER) :]:
        start = lines.index(BEGIN_MARKER)
        end = lines.index(END_MARKER, start)
        before, after = "\n".join(lines[:start]).rstrip(), "\n".join(lines[end + 1 :]).strip()
    elif existing.startswith(_UNMARKED_CARD_START):
        before, after = "", ""
    else:
        before, after = existing.rstrip(), ""
    return "\n\n".join(part for part in (before, section, after) if part) + "\n"


def _code_block(code_lines: list[str]) -> list[str]:
    # A fence longer than any backtick run inside, so no user string can close it early.
    runs = [len(run) for line in code_lines for run in re.findall(r"`+", line)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return [f"{fence}python", *code_lines, fence]


def _python(value: str) -> str:
    """A Python string literal for ``value``: quotes and escapes, and never a line break."""
    literal = json.dumps(value, ensure_ascii=False)
    # JSON leaves U+2028/U+2029 raw; some viewers break lines there.
    return literal.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _markdown(value: Any) -> str:
    """``value`` as inline Markdown text: one line, with every character that Markdown or HTML reads escaped."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def _as_text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"
