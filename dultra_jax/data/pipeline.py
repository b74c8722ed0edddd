"""grain pipelines for GRPO: shuffled, repeated prompts, each repeated ``num_generations`` times per batch.

Like TRL's ``RepeatSampler`` in the original: a batch holds ``prompts_per_batch`` distinct prompts, each
repeated ``num_generations`` times consecutively (a group never spans batches); the order is reshuffled every
epoch (seeded). Prompts are chat-templated, tokenised (without special tokens, as the original's rollouts),
left-truncated to ``max_prompt_length`` and left-padded with the EOS id (the original's pad token) to the
longest prompt of the batch, rounded up to ``pad_to_multiple`` (capped at ``max_prompt_length``) so that the
rollout and the train step compile once per padded length, not once per batch.

On several processes each one builds the same pipeline with its ``shard_index`` / ``shard_count``: all walk
the same shuffled order of prompts (so the iterator state is the same everywhere), and each tokenises and
yields only its own contiguous share of every batch's prompts (whole groups).

The iterator's position is a small JSON-able dict (``get_state``/``set_state``); :func:`save_iterator_state`
writes it atomically next to a training checkpoint so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax.atomic import write_atomic
from dultra_jax.data.prompts import render_chat
from dultra_jax.data.tasks import DataError, Example


def tokenize_prompts(
    tokenizer,
    texts: Sequence[str],
    *,
    max_prompt_length: int | None = 512,
    add_special_tokens: bool = False,
    pad_id: int | None = None,
    pad_to_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 [N, P]: left-truncated to ``max_prompt_length``, left-padded."""
    rows = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    return _left_pad(rows, pad_id=_pad_id(tokenizer, pad_id), max_len=max_prompt_length, multiple=pad_to_multiple)


def _pad_id(tokenizer, pad_id: int | None) -> int:
    pid = pad_id if pad_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has no eos token to pad with; pass pad_id explicitly")
    return int(pid)


def _left_pad(rows: Sequence[Sequence[int]], *, pad_id: int, max_len: int | None, multiple: int):
    rows = [list(r)[-max_len:] if max_len else list(r) for r in rows]
    width = max((len(r) for r in rows), default=0)
    rounded = max(1, -(-width // max(1, multiple)) * max(1, multiple))
    width = max(width, min(rounded, max_len)) if max_len else rounded
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
    return ids, mask


class PromptPipeline:
    """A grain pipeline over :class:`Example`\\ s yielding prompt batches for rollouts.

    Each batch is a dict of numpy arrays: ``input_ids`` / ``attention_mask`` [prompts_per_batch *
    num_generations / shard_count, P], ``example_index`` (position in ``examples``) and ``group`` (which prompt
    of the whole batch).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        *,
        prompts_per_batch: int = 1,
        num_generations: int = 12,
        seed: int = 42,
        shuffle: bool = True,
        num_epochs: int | None = None,
        max_prompt_length: int | None = 512,
        add_special_tokens: bool = False,
        pad_id: int | None = None,
        pad_to_multiple: int = 1,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        if not examples:
            raise DataError("PromptPipeline needs at least one example")
        if prompts_per_batch < 1 or num_generations < 1:
            raise DataError(f"prompts_per_batch ({prompts_per_batch}) and num_generations ({num_generations}) "
                            "must be >= 1")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.prompts_per_batch = int(prompts_per_batch)
        self.num_generations = int(num_generations)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.max_prompt_length = max_prompt_length
        self.add_special_tokens = add_special_tokens
        self.pad_id = _pad_id(tokenizer, pad_id)
        self.pad_to_multiple = int(pad_to_multiple)
        if not 0 <= shard_index < shard_count or self.prompts_per_batch % shard_count:
            raise DataError(f"shard {shard_index} of {shard_count}: prompts_per_batch ({prompts_per_batch}) must be a "
                            "multiple of the number of shards (processes), and the index inside it")
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)

    def _encode(self, index: int) -> np.ndarray:
        text = render_chat(self.tokenizer, list(self.examples[index].messages))
        return np.asarray(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"], np.int32)

    def _collate(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        g = self.num_generations
        k = len(items) // self.shard_count
        first = self.shard_index * k
        mine = [int(i) for i in items[first:first + k]]
        rows = [row for i in mine for row in [self._encode(i)] * g]
        ids, mask = _left_pad(rows, pad_id=self.pad_id, max_len=self.max_prompt_length,
                              multiple=self.pad_to_multiple)
        index = np.repeat(np.asarray(mine, np.int64), g)
        group = np.repeat(np.arange(first, first + len(mine), dtype=np.int32), g)
        return {"input_ids": ids, "attention_mask": mask, "example_index": index, "group": group}

    def dataset(self):
        """The grain ``IterDataset`` (shuffle -> repeat -> batch -> this shard's prompts, tokenised)."""
        import grain

        ds = grain.MapDataset.range(len(self.examples))
        if self.shuffle:
            ds = ds.seed(self.seed).shuffle()
        ds = ds.repeat(self.num_epochs)
        # Batch the IterDataset: an infinite MapDataset has length sys.maxsize, which MapDataset.batch(1) overflows.
        return ds.to_iter_dataset().batch(self.prompts_per_batch, drop_remainder=self.num_epochs is not None,
                                          batch_fn=self._collate)

    def __iter__(self):
        return iter(self.dataset())

    def examples_for(self, batch: dict[str, np.ndarray]) -> list[Example]:
        """The :class:`Example` of every row of ``batch`` (for the reward functions)."""
        return [self.examples[int(i)] for i in batch["example_index"]]


def save_iterator_state(iterator, path: str | Path) -> Path:
    """Write ``iterator.get_state()`` as JSON, atomically (temp file + rename)."""
    path = Path(path)
    write_atomic(path, json.dumps(_jsonable(iterator.get_state())))
    return path


def load_iterator_state(iterator, path: str | Path) -> None:
    """Restore a position written by :func:`save_iterator_state`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"iterator state not found: {path}")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"iterator state {path} is not valid JSON: {e}") from e
    iterator.set_state(state)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        raise DataError("grain iterator state contains bytes; it cannot be saved as JSON")
    return x
