"""What may be written where: checks every command runs on its output path before it writes anything.

Rules (docs/outputs.md, "Files, overwrites and errors"): an output path that is a regular file is refused; results
a user already has are never replaced without an explicit flag; ``--overwrite`` replaces only a directory that
is ours (our marker files are in it) and never one that contains the source it is made from.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dultra_jax.config import ConfigError

# Files that mark a directory as one of ours (or as a checkpoint in the original's format, which we write too).
CONVERTED_MARKER = "dultra_jax.json"
HF_MARKERS = ("model.safetensors", "model.safetensors.index.json")
RUN_CONFIG = "config.json"


def require_directory_path(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory we may create: refused when it (or a parent) is an existing regular file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{flag} {path}: {p} is a file, not a directory; choose a directory path")
    return path


def is_model_dir(path: str | Path) -> bool:
    """A checkpoint directory: ours (converted) or the original's (config.json + safetensors)."""
    path = Path(path)
    return (path / CONVERTED_MARKER).is_file() or (
        (path / "config.json").is_file() and any((path / m).is_file() for m in HF_MARKERS))


def check_replaceable(target: str | Path, *, source: str | Path | None = None) -> None:
    """Refuse to delete ``target`` (for ``--overwrite``) unless it is a checkpoint directory (or empty) and does
    not contain ``source``."""
    target = Path(target)
    if source is not None and _contains(target, Path(source)):
        raise ConfigError(f"output directory {target} contains the source {source}; --overwrite would delete it. "
                          "Choose an output directory outside the source")
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"output path {target} is a file, not a directory; choose a directory path")
    if any(target.iterdir()) and not is_model_dir(target):
        raise ConfigError(f"output directory {target} is not a checkpoint directory of ours (no {CONVERTED_MARKER} "
                          f"or config.json + safetensors); --overwrite only replaces those. Choose another path")


def _contains(parent: Path, child: Path) -> bool:
    parent, child = parent.resolve(), child.resolve()
    return child == parent or child.is_relative_to(parent)


def check_results_dir(out: str | Path, files: Iterable[str], *, resume: bool = False, overwrite: bool = False,
                      flag: str = "--out", resume_marker: str | None = None) -> Path:
    """An output directory for results named ``files``: refused when it already holds any of them, unless
    ``overwrite`` (replace them) or ``resume`` (continue the run, which ``resume_marker`` must record)."""
    out = require_directory_path(out, flag)
    if not out.is_dir():
        return out
    found = [f for f in files if (out / f).exists()]
    if resume and resume_marker is not None and found and not (out / resume_marker).is_file():
        raise ConfigError(f"{flag} {out} holds {', '.join(found)} but no {resume_marker}: not a run --resume can "
                          f"continue; choose another {flag}")
    if found and not (resume or overwrite):
        how = "--resume to continue that run, --overwrite to replace it," if resume_marker else "--overwrite to " \
              "replace them"
        raise ConfigError(f"{flag} {out} already holds {', '.join(found)}; pass {how} or choose another {flag}")
    return out


def check_run_dir(out: str | Path) -> Path:
    """A training output directory: new, or one of our runs (which the trainer resumes). A checkpoint directory
    is refused: the run's config.json would replace the model's and the model would no longer load."""
    out = require_directory_path(out, "--output-dir")
    if is_model_dir(out):
        raise ConfigError(f"--output-dir {out} is a model directory (its config.json would be replaced and it would "
                          "no longer load); choose a new directory for the run")
    cfg = out / RUN_CONFIG
    if cfg.is_file():
        import json

        try:
            ours = isinstance(data := json.loads(cfg.read_bytes()), dict) and {"train", "model"} <= data.keys()
        except ValueError:
            ours = False
        if not ours:
            raise ConfigError(f"--output-dir {out} holds a config.json that is not a run config of ours; choose a "
                              "new directory for the run")
    return out
