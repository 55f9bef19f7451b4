"""All-or-nothing writes: a file or folder is built beside its destination, then renamed into place.

The one writer behind the adapter save, the feature cache and the trainer's outputs. A rename within one
folder is atomic on POSIX file systems, so a reader sees the old content or the new, never a part of it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path


def temporary_prefix(destination: str | os.PathLike) -> str:
    """The name prefix of this process's temporaries for ``destination`` (hidden, with host and pid)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
    return f".{Path(destination).name}.tmp-{host}-{os.getpid()}-"


def remove_abandoned(destination: str | os.PathLike) -> None:
    """Remove the temporaries that killed processes of this host left beside ``destination``."""
    destination = Path(destination)
    own = temporary_prefix(destination)
    host_part = own[: own.rindex("-", 0, -1)]  # ".<name>.tmp-<host>"
    pattern = re.compile(re.escape(host_part) + r"-(\d+)-")
    if not destination.parent.is_dir():
        return
    for path in destination.parent.glob(f".{destination.name}.tmp-*"):
        match = pattern.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            _remove(path)


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh path beside ``destination`` to write a file or folder at; it replaces ``destination`` on exit.

    If the body raises (a full disk, Ctrl-C, a bug), the temporary is removed and ``destination`` keeps what it
    held; an ``OSError`` is raised again naming ``destination``.

    Example::

        with atomic_path("out/all_results.json") as path:
            path.write_text(json.dumps(results))
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f"{temporary_prefix(destination)}{uuid.uuid4().hex[:8]}"
    with _naming_errors(destination, temporary):
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"Nothing was written for {destination}: the writer created no file or folder.")
        fsync_tree(temporary)
        _replace(temporary, destination)
        fsync_tree(destination.parent, recursive=False)


@contextlib.contextmanager
def staging_folder(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh, empty folder beside ``destination`` for a writer that moves its files in itself.

    Temporaries that killed processes of this host left are removed first; the folder is removed on exit.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(destination)
    staging = destination.parent / f"{temporary_prefix(destination)}{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        _remove(staging)


@contextlib.contextmanager
def _naming_errors(destination: Path, temporary: Path) -> Iterator[None]:
    """Remove ``temporary`` when the body fails, and make an ``OSError`` name ``destination``."""
    try:
        yield
    except OSError as error:
        _remove(temporary)
        if str(destination) in str(error):
            raise
        reason = error.strerror or str(error)
        raise OSError(
            error.errno,
            f"Could not write {destination}: {reason}. Nothing was written there; what it held before is intact.",
        ) from error
    except BaseException:
        _remove(temporary)
        raise


def write_text(destination: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``destination`` all at once, or not at all."""
    with atomic_path(destination) as path:
        path.write_text(text, encoding="utf-8")


def fsync_tree(path: str | os.PathLike, *, recursive: bool = True) -> None:
    """Flush ``path`` (and, for a folder, what it holds) to disk, so that a rename never exposes missing data."""
    path = Path(path)
    paths = [*(path.rglob("*") if recursive and path.is_dir() else ()), path]
    for item in paths:
        try:
            handle = os.open(item, os.O_RDONLY)
        except OSError:  # folders on Windows, vanished entries
            continue
        try:
            os.fsync(handle)
        except OSError:
            pass
        finally:
            os.close(handle)


def _replace(temporary: Path, destination: Path) -> None:
    if not temporary.is_dir():
        os.replace(temporary, destination)
        return
    # A folder cannot replace a non-empty folder in one rename: move the old one aside first. Checking for it
    # beforehand would race with a concurrent writer, so the rename itself says whether it is there.
    while True:
        try:
            os.replace(temporary, destination)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = destination.parent / f"{temporary_prefix(destination)}old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):  # another writer moved it aside already
            os.replace(destination, old)
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True
