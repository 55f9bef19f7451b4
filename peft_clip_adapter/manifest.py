"""Saves that are atomic as a set: a manifest of each save's files, checked on every load.

``save_pretrained`` writes an adapter's files (config, weights, class prompts) into a staging folder, records
their SHA-256 digests in ``adapter_manifest.json`` and moves the manifest into the target folder first, the
files after it. Until the last file has moved, the folder does not match its manifest, so a reader refuses a
folder that a killed save left mixing two saves instead of loading a config beside another save's weights.
Files saved this way also get the permissions a plain ``open`` would give them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from peft.utils import CONFIG_NAME

#: Written by ``save_pretrained`` beside each adapter's files: their SHA-256 digests.
MANIFEST_NAME = "adapter_manifest.json"
MANIFEST_FORMAT = 1

# Where the base model is found: a user may repoint a saved adapter at a local copy, which changes nothing saved.
_POINTER_FIELDS = ("base_model_name_or_path", "revision")
_RESAVE_HINT = "Save the adapter again, or download it again if it came from the Hub."


def write_manifest(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Record the SHA-256 of each of ``names`` (files in ``folder``) in ``folder/adapter_manifest.json``.

    ``save_pretrained`` writes it into the new save before moving the files into place, manifest first, so
    that until the last file has moved the folder does not match its manifest (see :func:`verify_manifest`).
    The digest of ``adapter_config.json`` leaves out where the base model is found
    (``base_model_name_or_path``, ``revision``), so pointing a saved adapter at a local copy of its base
    model by hand does not count as a change.

    Args:
        folder: The folder holding the files.
        names: File names relative to ``folder``.

    Returns:
        The manifest's path.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "adapter_config.json").write_text("{}")
        >>> write_manifest(folder, ["adapter_config.json"]).name
        'adapter_manifest.json'
        >>> verify_manifest(folder)
    """
    folder = Path(folder)
    files = {name: {"sha256": _digest_of(folder / name)} for name in sorted(names)}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n", encoding="utf-8")
    return path


def _digest_of(path: Path) -> str:
    digest = hashlib.sha256()
    if path.name == CONFIG_NAME:
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            content = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(content, dict):
                kept = {key: value for key, value in content.items() if key not in _POINTER_FIELDS}
                digest.update(json.dumps(kept, sort_keys=True).encode())
                return digest.hexdigest()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_mismatch(folder: str | os.PathLike) -> Optional[str]:
    """Why the files of ``folder`` are not the set its ``adapter_manifest.json`` records, or ``None``.

    Args:
        folder: An adapter folder.

    Returns:
        ``None`` when the files match, or when there is no manifest (a folder saved by another tool or an
        older version); otherwise the explanation (a damaged manifest, a missing or changed file).

    Example:
        >>> import tempfile
        >>> manifest_mismatch(tempfile.mkdtemp()) is None
        True
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        records = {
            name: str(record["sha256"]) for name, record in json.loads(path.read_text("utf-8"))["files"].items()
        }
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{path} is damaged ({error!r}). {_RESAVE_HINT}"
    for name, digest in sorted(records.items()):
        file = folder / name
        if not file.is_file():
            return (
                f"{folder} is incomplete: {name} is missing, though {MANIFEST_NAME} lists it. A save into this "
                "folder was interrupted: save the adapter again."
            )
        if _digest_of(file) != digest:
            return (
                f"{file} is not the file {MANIFEST_NAME} records: the folder mixes two saves (a save into it was "
                "interrupted) or the file was changed afterwards. Save the adapter again; if you changed the file "
                f"on purpose, delete {MANIFEST_NAME}."
            )
    return None


def verify_manifest(folder: str | os.PathLike) -> None:
    """Check that the files of ``folder`` are the set its ``adapter_manifest.json`` records.

    A folder without a manifest (saved by another tool or an older version) passes unchecked.

    Args:
        folder: An adapter folder.

    Returns:
        None.

    Raises:
        ValueError: with :func:`manifest_mismatch`'s explanation: the manifest is damaged, or a file it lists
            is missing or differs (the folder mixes two saves, or a file was changed afterwards).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "adapter_config.json").write_text("{}")
        >>> _ = write_manifest(folder, ["adapter_config.json"])
        >>> _ = (folder / "adapter_config.json").write_text('{"ratio": 0.5}')
        >>> verify_manifest(folder)
        Traceback (most recent call last):
        ...
        ValueError: ...adapter_config.json is not the file adapter_manifest.json records: ...
    """
    problem = manifest_mismatch(folder)
    if problem:
        raise ValueError(problem)


def apply_default_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the mode a plain ``open`` / ``mkdir`` would (``0644`` / ``0755``
    under the usual umask), so files saved through a private temporary file or folder are readable by the
    rest of a team sharing the folder (safetensors writes ``0600``, ``mkdtemp`` makes ``0700``).

    Args:
        root: A file or folder.

    Returns:
        None.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()  # 0700
        >>> apply_default_permissions(folder)
        >>> oct(os.stat(folder).st_mode & 0o777) == oct(0o777 & ~_umask())
        True
    """
    mask = _umask()
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
