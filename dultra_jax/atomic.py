"""Atomic file writes: a temporary file in the target's directory, then a rename (never a half-written file).

The one place the package writes a finished file: text, bytes, or whatever a writer puts at a path (e.g.
matplotlib's ``savefig``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp)`` write a temporary file next to ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary file and a rename."""
    if isinstance(data, bytes):
        return write_atomic_with(path, lambda tmp: tmp.write_bytes(data))
    return write_atomic_with(path, lambda tmp: tmp.write_text(data, encoding="utf-8"))
