"""Checking a directory the user named before any work depends on it."""

from __future__ import annotations

import os
from pathlib import Path


def directory_problem(path: Path, *, writable: bool) -> str | None:
    """Why `path` cannot serve as a directory (to write into, if `writable`), or None.

    A directory that does not exist yet is fine when its nearest existing parent is a
    writable directory: it will be created there.
    """
    if str(path) == "":
        return "is empty"
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory, so {path} cannot be created"
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
