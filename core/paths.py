"""Checking a directory the user named before any work depends on it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

NAME_MAX = 255  # bytes per path component on Linux file systems


def directory_problem(path: Path, *, writable: bool) -> str | None:
    """Why `path` cannot serve as a directory (to write into, if `writable`), or None.

    A directory that does not exist yet is fine when it can be created: its nearest existing
    parent is a directory where a test directory could be made (and was removed at once),
    and no component of the new part is too long for the file system.
    """
    if str(path) == "":
        return "is empty"
    longest = max((len(part.encode()) for part in path.parts), default=0)
    if longest > NAME_MAX:
        return f"has a name of {longest} bytes; file systems allow {NAME_MAX}"
    try:
        return _problem(path, writable)
    except OSError as error:
        return f"{path}: {os.strerror(error.errno) if error.errno else error}"


def _problem(path: Path, writable: bool) -> str | None:
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (or a loop of them)"
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a broken symbolic link (or a loop of them)"
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory, so {path} cannot be created"
    if writable:
        return _creation_problem(existing)
    return None


def _creation_problem(directory: Path) -> str | None:
    """Try to create (and remove) a directory in `directory`: os.access says yes to root on
    /proc and to read-only mounts, where creating anything fails."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compound-probe-", dir=directory))
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{directory} is not writable ({reason})"
        return f"cannot create directories in {directory} ({reason})"
    return None
