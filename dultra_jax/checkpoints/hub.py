"""Model references: a local directory, or a Hugging Face hub id ``org/name[@revision]`` fetched on demand.

Every entry point that takes a model (``dultra_jax.load``, ``convert``, each CLI ``--model``) resolves it here,
so ``sengi/dUltra-math`` works wherever a path does. A local directory always wins over a hub id of the same
spelling. Hub ids go through ``huggingface_hub.snapshot_download`` for only the files this project reads
(config, safetensors and their index, tokenizer files), into the standard hub cache: ``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; with ``HF_HUB_OFFLINE=1`` only that cache is consulted.
The environment is read at call time, so setting it in a running program takes effect.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dultra_jax.checkpoints.errors import CheckpointError

# The files load/convert/tokenizer loading read; nothing else (no .bin / .pt / .gguf duplicates) is fetched.
HUB_ALLOW_PATTERNS = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# org/name, each part as the hub spells repo names; an optional @revision (branch, tag, commit or refs/pr/N).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<revision>[\w.\-/]+))?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``ref`` is not spelled like a hub id."""
    m = _HUB_ID.match(str(ref))
    if m is None or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("revision")


def hub_cache_dir() -> Path:
    """Where the hub cache is, by the hub's own environment variables (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve_model_path(ref: str | os.PathLike, *, what: str = "model", cache_dir: str | Path | None = None) -> Path:
    """A local directory as is; a hub id ``org/name[@revision]`` -> the cached snapshot directory.

    Raises :class:`CheckpointError` naming ``ref`` when it is neither an existing directory nor a hub id that
    can be fetched (offline or unreachable and not in the cache, unknown repo or revision).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {str(ref)!r} is a file; give a checkpoint directory or a hub id org/name")
    parsed = parse_hub_id(str(ref))
    if parsed is None:
        raise CheckpointError(f"{what} directory not found: {path} (nor is {str(ref)!r} a hub id org/name[@revision])")
    repo, revision = parsed
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    offline = hub_offline()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=offline,
                                      allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except Exception as e:  # noqa: BLE001 - network, auth, unknown repo/revision, cache miss: one clear message
        where = (f"HF_HUB_OFFLINE is set and the cache {cache} has no snapshot of it" if offline
                 else f"it could not be fetched into {cache}")
        raise CheckpointError(
            f"{what} {str(ref)!r} is not a local directory, and as a Hugging Face hub id ({repo}"
            f"{'@' + revision if revision else ''}) {where}: {type(e).__name__}: {e}. Pass a local checkpoint "
            "directory, or download it first (unset HF_HUB_OFFLINE, check the id and your network/token)"
        ) from e
