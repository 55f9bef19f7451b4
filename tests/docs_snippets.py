"""Run the documentation's Python snippets offline, against tiny local models.

Every ```python block in README.md and docs/**/*.md is a test. The blocks of one page run in order, in one
namespace (a page may build on its earlier blocks), in a fresh temporary working directory. Two things
make Hub-style code run with no network:

- ``offline_hub`` fills a private Hugging Face cache (the layout ``huggingface_hub`` itself writes:
  ``models--<org>--<name>/snapshots/<revision>/`` plus ``refs/main``) with a tiny CLIP built by
  ``peft_clip_adapter.testing.tiny_models.build_tiny_clip`` under the ids in ``TINY_MODEL_IDS``, and points
  ``huggingface_hub.constants.HF_HUB_CACHE`` at it. With ``HF_HUB_OFFLINE=1`` (set by conftest),
  ``from_pretrained("openai/clip-vit-base-patch16")`` then resolves through the real loading code.
- ``HfApi.create_repo`` and ``HfApi.upload_folder`` are replaced by fakes that write the uploaded folder
  into the same cache as a new snapshot, so a snippet that pushes an adapter can pull it back by its
  repo id; every upload is recorded in ``OfflineHub.uploads``.

A block that cannot run offline is preceded by ``<!-- skip-test: <reason> -->`` (keep them few).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import textwrap
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

#: Hub ids the docs may load; each resolves to the tiny CLIP inside ``offline_hub``.
TINY_MODEL_IDS: tuple[str, ...] = (
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-large-patch14",
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SKIP = re.compile(r"<!--\s*skip-test:\s*(?P<reason>.*?)\s*-->")
_PYTHON_LANGUAGES = {"python", "py", "python3"}


@dataclass
class Snippet:
    """One fenced Python block of a Markdown page.

    Args:
        code: The block's source, dedented.
        line: 1-based line number of the block's first code line in the page.
        skip_reason: Why the block is not run (from a ``<!-- skip-test: ... -->`` marker), or ``None``.
    """

    code: str
    line: int
    skip_reason: Optional[str] = None


def fenced_blocks(markdown: str, languages: Collection[str]) -> list[Snippet]:
    """The fenced code blocks of a Markdown text whose language is in ``languages``, in order.

    The language is the first word of the info string (a ``title="..."`` or other attributes may
    follow). A ``<!-- skip-test: reason -->`` comment on the nearest non-blank line above the opening
    fence marks the block as skipped. Blocks indented under an admonition or a list are dedented.

    Raises:
        ValueError: if a fence is never closed, or a skip marker gives no reason.

    Example:
        >>> page = "```bash\\nls\\n```\\n```python\\nx = 1\\n```\\n"
        >>> [(s.code, s.line) for s in fenced_blocks(page, {"bash", "sh"})]
        [('ls\\n', 2)]
    """
    lines = markdown.splitlines()
    blocks: list[Snippet] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise ValueError(f"The code fence opened on line {index + 1} is never closed.")
        language = info.split()[0].strip("{}.").lower() if info else ""
        if language in languages:
            code = textwrap.dedent("\n".join(lines[index + 1 : end]) + "\n")
            blocks.append(Snippet(code, index + 2, _skip_reason(lines, index)))
        index = end + 1
    return blocks


def python_snippets(markdown: str) -> list[Snippet]:
    """The fenced Python blocks (``python``, ``py`` or ``python3``) of a Markdown text, in order.

    Raises:
        ValueError: as ``fenced_blocks``.

    Example:
        >>> page = "Text\\n\\n```python\\nx = 1\\n```\\n<!-- skip-test: needs a GPU -->\\n```py\\ny = 2\\n```\\n"
        >>> [(s.code, s.line, s.skip_reason) for s in python_snippets(page)]
        [('x = 1\\n', 4, None), ('y = 2\\n', 8, 'needs a GPU')]
    """
    return fenced_blocks(markdown, _PYTHON_LANGUAGES)


def shell_commands(markdown: str) -> list[str]:
    """The commands of the page's ``bash`` / ``sh`` / ``console`` blocks, one per command.

    Lines continued with a trailing backslash are joined; comments and blank lines are dropped.

    Example:
        >>> shell_commands("```bash\\n# train\\npython a.py \\\\\\n  --x 1\\n```\\n")
        ['python a.py --x 1']
    """
    commands = []
    for block in fenced_blocks(markdown, {"bash", "sh", "shell", "console"}):
        joined = re.sub(r"\s*\\\n\s*", " ", block.code)  # join "\\"-continued lines
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _skip_reason(lines: Sequence[str], fence_index: int) -> Optional[str]:
    above = fence_index - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    if above < 0:
        return None
    marker = _SKIP.search(lines[above])
    if marker is None:
        return None
    if not marker["reason"]:
        raise ValueError(f"The skip-test marker on line {above + 1} must say why: <!-- skip-test: reason -->.")
    return marker["reason"]


def run_page(path: Path) -> int:
    """Run the page's Python blocks in order in one namespace; return how many ran.

    Line numbers in tracebacks are the page's own, so a failure points at the Markdown line.

    Raises:
        AssertionError: naming the page and line of the first block that fails, chained to its error.
    """
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    ran = 0
    for snippet in python_snippets(path.read_text(encoding="utf-8")):
        if snippet.skip_reason is not None:
            continue
        # Padding with blank lines makes the compiled line numbers match the Markdown file's.
        code = compile("\n" * (snippet.line - 1) + snippet.code, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"The snippet at {path}:{snippet.line} failed: {error!r}") from error
        ran += 1
    return ran


@dataclass
class OfflineHub:
    """A private Hugging Face cache holding tiny models, and a record of the uploads into it.

    Args:
        cache_dir: The cache folder (what ``HF_HUB_CACHE`` points at while the hub is active).
        uploads: ``(repo_id, sorted file names)`` for each intercepted ``upload_folder`` call.
    """

    cache_dir: Path
    uploads: list[tuple[str, list[str]]] = field(default_factory=list)

    def add_snapshot(self, repo_id: str, folder: Path) -> Path:
        """Copy ``folder`` into the cache as the ``main`` revision of model repo ``repo_id``."""
        digest = hashlib.sha1()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
        revision = digest.hexdigest()
        repo = self.cache_dir / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        shutil.copytree(folder, snapshot, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return snapshot


@contextlib.contextmanager
def offline_hub(
    cache_dir: Path, tiny_model_dir: Path, model_ids: Sequence[str] = TINY_MODEL_IDS
) -> Iterator[OfflineHub]:
    """Serve ``tiny_model_dir`` under ``model_ids`` from a private cache and intercept Hub uploads.

    Args:
        cache_dir: An empty folder for the cache.
        tiny_model_dir: A saved model folder (``build_tiny_clip``'s output) to serve under each id.
        model_ids: The Hub ids to serve it under.

    Returns:
        A context manager yielding the ``OfflineHub``; the real cache and ``HfApi`` are restored on exit.
    """
    from unittest import mock

    from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants

    hub = OfflineHub(Path(cache_dir))
    for repo_id in model_ids:
        hub.add_snapshot(repo_id, Path(tiny_model_dir))

    def create_repo(self: HfApi, repo_id: str, **kwargs: Any) -> RepoUrl:
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    def upload_folder(self: HfApi, *, repo_id: str, folder_path: str, commit_message: str = "", **kwargs: Any):
        folder = Path(folder_path)
        hub.uploads.append((repo_id, sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())))
        revision = hub.add_snapshot(repo_id, folder).name
        return CommitInfo(
            commit_url=f"{constants.ENDPOINT}/{repo_id}/commit/{revision}",
            commit_message=commit_message or "",
            commit_description="",
            oid=revision,
        )

    with (
        mock.patch.object(constants, "HF_HUB_CACHE", str(cache_dir)),
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "upload_folder", upload_folder),
    ):
        yield hub
