"""A task's problems, the tokenizer that reads them, and prompt/completion text <-> ids for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dultra_jax.data import synthetic
from dultra_jax.data.tasks import DataError, Example
from dultra_jax.eval.settings import EvalError
from dultra_jax.tasks import SYNTHETIC_DEFAULT_N, TOKENIZER_FILES, Task, get_task, task_names
from dultra_jax.text import TextCodec, TextModel

EVAL_TASKS = tuple(task_names("eval"))
__all__ = ["EVAL_TASKS", "SYNTHETIC_DEFAULT_N", "TOKENIZER_FILES", "completion_text", "encode_prompts", "eval_task",
           "known_ids", "load_examples", "load_tokenizer"]


def eval_task(name: str) -> Task:
    """The task record of ``dultra eval --task name``."""
    try:
        return get_task(name, "eval")
    except DataError as e:
        raise EvalError(str(e)) from None


def load_examples(task: str, *, data_file: str | Path | None = None, split: str | None = None,
                  limit: int | None = None, cache_dir: str | Path | None = None, max_operand: int | None = None
                  ) -> list[Example]:
    """Problems of ``task`` with the evaluation's prompts (``style="eval"``); the first ``limit`` of them.

    A generated task's problems are the trainer's held-out ones (``max_operand`` as in ``task.max_operand``)."""
    t = eval_task(task)
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if max_operand is not None and t.hub is not None:
        raise EvalError(f"--max-operand is an option of generated tasks ({synthetic.TASK_NAME}), not of {task!r}")
    if max_operand is not None and max_operand < 0:
        raise EvalError(f"--max-operand must be >= 0, got {max_operand}")
    try:
        return t.examples("eval", split=split, data_file=data_file, limit=limit, cache_dir=cache_dir,
                          max_operand=max_operand)
    except DataError as e:
        if t.hub is None:  # a bad option of a generated task (the hub's own errors keep their type)
            raise EvalError(str(e)) from None
        raise


def load_tokenizer(model_path: str | Path | None, task: str):
    """The task's built-in tokenizer, else the model directory's (AutoTokenizer, offline; a hub id resolves to
    its cached snapshot as :func:`dultra_jax.load` resolves it)."""
    try:
        return eval_task(task).tokenizer(model_path)
    except DataError as e:
        raise EvalError(str(e)) from None


def encode_prompts(text, examples: Sequence[Example], *, add_special_tokens: bool | None = None
                   ) -> tuple[list[str], list[list[int]]]:
    """Chat-templated prompt texts and their ids, encoded by :class:`~dultra_jax.text.TextCodec` as
    :class:`~dultra_jax.text.TextModel` (the server, ``dultra generate``) encodes them: with the tokenizer's
    default special tokens as the original's evaluation does (``add_special_tokens`` overrides). ``text``: a
    TextModel, a TextCodec or a tokenizer."""
    codec = _codec(text)
    texts = [codec.render(e.messages) for e in examples]
    return texts, [codec.encode_text(t, add_special_tokens=add_special_tokens) for t in texts]


def known_ids(tokenizer) -> np.ndarray:
    """Sorted ids the tokenizer can decode (the model's embedding may have more rows than the vocabulary)."""
    return TextCodec(tokenizer).known


def completion_text(text, ids) -> str:
    """Generated ids -> text without special tokens (:meth:`TextCodec.decode`); ids the tokenizer does not know
    carry no text. ``text``: a TextModel, a TextCodec (build it once for many calls) or a tokenizer."""
    return _codec(text).decode(ids)


def _codec(text) -> TextCodec:
    if isinstance(text, TextModel):
        return text.codec
    return text if isinstance(text, TextCodec) else TextCodec(text)
