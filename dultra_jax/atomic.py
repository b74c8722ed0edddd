"""Atomic file writes: a temporary file in the target's directory, then a rename (never a half-written file).

``mkstemp`` creates files 0600 whatever the umask; collaborators on a shared file system must be able to read
what we write, so every finished file gets the mode an ordinary ``open(..., "w")`` would have given it
(0o666 & ~umask; directories 0o777 & ~umask).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (read without changing it for longer than two system calls)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def apply_umask(root: str | Path) -> None:
    """Give ``root`` (a file or a directory tree we just wrote) the modes the umask asks for."""
    root = Path(root)
    fmode, dmode = file_mode(), dir_mode()
    if root.is_file():
        os.chmod(root, fmode)
        return
    os.chmod(root, dmode)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), dmode)
        for f in files:
            p = os.path.join(base, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is given the umask's mode and renamed to ``path``
    (for writers that want a file name, e.g. matplotlib's ``savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_atomic_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Let ``write(tmp)`` write a temporary file next to ``path``, then give it the umask's mode and rename it
    onto ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)
