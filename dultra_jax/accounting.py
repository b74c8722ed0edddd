"""Speed accounting: which generated ids count, NFE per sample, and TPF, defined once for every caller.

Decoding, evaluation, training statistics and the CLI all import this module, so a number called "TPF" means
the same thing wherever it is printed (docs/original.md §4):

- NFE of a sample: backbone forwards in which its row was still decoding (``DecodeResult.nfe``, the batch-1
  count). The loop counts them; this module only reads them.
- Effective tokens of a sample: generated ids that are not end-of-text, pad, the tokenizer's ``<|eot_id|>``, or
  a MASK left on the canvas when the iteration cap stopped decoding early (a position never decoded is not a
  token the model produced).
- TPF: mean effective tokens / mean NFE over the samples (the original's ratio of means, not a mean of ratios;
  0.0 when there were no forwards).

Pure numpy on host arrays so it can be checked on hand-made rows and never enters a jitted function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EOT_TOKEN = "<|eot_id|>"


def excluded_ids(eos_id: int | None, pad_id: int | None, tokenizer: Any = None, *,
                 mask_id: int | None = None) -> list[int]:
    """Ids that are not effective tokens: end-of-text, pad, MASK and the tokenizer's ``<|eot_id|>`` (sorted)."""
    ids = {int(i) for i in (eos_id, pad_id, mask_id) if i is not None}
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if EOT_TOKEN in vocab:
            ids.add(int(vocab[EOT_TOKEN]))
    return sorted(ids)


def model_excluded_ids(cfg: Any, tokenizer: Any = None) -> list[int]:
    """:func:`excluded_ids` for a model config (its eos, pad and mask ids) and optionally its tokenizer."""
    return excluded_ids(cfg.eos_token_id, cfg.pad_token_id, tokenizer, mask_id=cfg.mask_token_id)


def effective_tokens(generated: Any, exclude_ids: Sequence[int]) -> np.ndarray:
    """Effective tokens per row of ``generated`` ([B, G] ids, prompt excluded): ids not in ``exclude_ids``."""
    gen = np.asarray(generated)
    return (~np.isin(gen, np.asarray(list(exclude_ids), np.int64))).sum(-1)


def tpf(effective: Sequence[float], nfe: Sequence[float]) -> float:
    """Mean effective tokens / mean NFE (0.0 when there were no forwards)."""
    nfe_arr = np.asarray(nfe, np.float64)
    if nfe_arr.size == 0 or nfe_arr.mean() == 0:
        return 0.0
    return float(np.mean(np.asarray(effective, np.float64)) / nfe_arr.mean())


@dataclass(frozen=True)
class DecodeAccount:
    """Per-row counts of one decode call (host numpy); the aggregates are properties."""

    effective_tokens: np.ndarray  # [B] int
    nfe: np.ndarray  # [B] int
    masks_left: np.ndarray  # [B] int: positions still MASK (iteration cap hit)

    @property
    def mean_nfe(self) -> float:
        return float(self.nfe.mean()) if self.nfe.size else float("nan")

    @property
    def mean_effective_tokens(self) -> float:
        return float(self.effective_tokens.mean()) if self.effective_tokens.size else float("nan")

    @property
    def tpf(self) -> float:
        return tpf(self.effective_tokens, self.nfe)


def account(generated: Any, nfe: Any, exclude_ids: Sequence[int], mask_id: int) -> DecodeAccount:
    """Count one decode: ``generated`` [B, G] ids and ``nfe`` [B] from :class:`~dultra_jax.decoding.DecodeResult`.

    ``exclude_ids`` should come from :func:`model_excluded_ids`; ``mask_id`` is added to it regardless, so a
    caller cannot count undecoded positions by passing a shorter list.
    """
    gen = np.asarray(generated)
    if gen.ndim != 2:
        raise ValueError(f"generated must be [batch, gen_length] ids, got shape {gen.shape}")
    nfe_arr = np.asarray(nfe).astype(np.int64).reshape(-1)
    if nfe_arr.shape[0] != gen.shape[0]:
        raise ValueError(f"nfe has {nfe_arr.shape[0]} rows for {gen.shape[0]} generated rows")
    masks = gen == int(mask_id)
    return DecodeAccount(effective_tokens=effective_tokens(gen, sorted({*map(int, exclude_ids), int(mask_id)})),
                         nfe=nfe_arr, masks_left=masks.sum(-1))
