"""Where a number was measured: the device and the code version (recorded beside every figure)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def device_name() -> str:
    """``cpu (x86_64, N device(s))`` or ``gpu:NVIDIA H200``."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.machine()}, {len(jax.devices())} device(s))"
    return f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"


def cpu_model() -> str:
    """The CPU's model name (results of CPU runs differ across CPU models; recorded beside them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """Short hash of the checkout the package runs from ("unknown" outside git)."""
    r = _git("rev-parse", "--short", "HEAD")
    return r.stdout.strip() if r is not None and r.returncode == 0 and r.stdout.strip() else "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None when unknown)."""
    r = _git("diff", "--quiet", "HEAD", "--")
    return None if r is None or r.returncode not in (0, 1) else r.returncode == 1
