"""The checkpoint's own tokenizer: read offline from its directory (HF ``AutoTokenizer`` files)."""

from __future__ import annotations

from pathlib import Path

from dultra_jax.checkpoints.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: str | Path) -> bool:
    """Whether ``path`` holds tokenizer files (converted directories carry the source's)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` of a local directory (never the network); a clear error when it has none."""
    path = Path(path)
    if not has_tokenizer(path):
        raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's "
                              "tokenizer into it (dultra convert does) or pass tokenizer=DIR")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
