"""Saves that are atomic as a set: a manifest of each save's files, checked on every load.

``save_pretrained`` stages an adapter's files, records their SHA-256 in ``adapter_manifest.json`` and moves the
manifest into the target folder first, the files after it: until the last file has moved, the folder does not
match its manifest, so a reader refuses a mix of two saves instead of loading one's config beside the other's
weights. Saved files also get the permissions a plain ``open`` would give them.
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

    The digest of ``adapter_config.json`` leaves out where the base model is found (``base_model_name_or_path``,
    ``revision``): pointing a saved adapter at a local copy of its base model is no change.
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
    """Why the files of ``folder`` are not the set its manifest records (damaged, missing, changed), or ``None``
    (also without a manifest: a folder from another tool or an older version)."""
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
    """Raise ``ValueError`` with :func:`manifest_mismatch`'s explanation, if there is one."""
    problem = manifest_mismatch(folder)
    if problem:
        raise ValueError(problem)


def apply_default_permissions(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the mode a plain ``open`` / ``mkdir`` would (``0644`` / ``0755`` under
    the usual umask): safetensors writes ``0600`` and temporary folders are ``0700``, unreadable to a team."""
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
