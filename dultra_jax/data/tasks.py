"""Task loaders: GSM8K, MATH500, DAPO-17k, APPS, HumanEval, MBPP as uniform :class:`Example` records.

Rows come from the Hugging Face hub through ``datasets`` (the original's dataset ids and splits), or from local
JSONL / JSON / parquet files with the hub's columns (``data_file``). Each record carries the prompt as a chat
conversation in the requested style (:mod:`dultra_jax.data.prompts`), the reference the reward compares
against (math) or the tests (code), and the row's other columns as metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A dataset that cannot be loaded or lacks the columns a task needs; the message says what to fix."""


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live on the hub (its record in :mod:`dultra_jax.tasks` holds this)."""

    name: str
    kind: str  # "math" | "code"
    hub_id: str
    hub_config: str | None
    splits: dict[str, str]  # style -> default split
    columns: tuple[str, ...]  # required columns (the hub schema)
    eval_hub_id: str | None = None  # evaluation reads this copy of the dataset instead


@dataclass(frozen=True)
class Example:
    """One problem: ``messages`` to render, and ``answer`` (math) or ``tests`` (code) to score against."""

    task: str
    index: int
    id: str
    question: str
    messages: tuple[dict[str, str], ...]
    answer: str | None = None
    tests: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"math" | "code": which teacher and rewards apply. Code problems carry tests to run, the others (the
        synthetic addition task included: arithmetic) an answer to check."""
        return "code" if self.tests is not None else "math"


def find_example(examples: Sequence[Example], *, id: Any = None, index: Any = None) -> Example:
    """The example whose ``id`` is ``id`` (e.g. ``"HumanEval/0"``, ``11``), or at position ``index``."""
    if id is not None:
        for e in examples:
            if e.id == str(id):
                return e
        raise DataError(f"no problem with id {id!r} (ids look like {[e.id for e in examples[:3]]})")
    if index is not None:
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise DataError(f"index must be an integer, got {index!r}") from None
        if 0 <= i < len(examples):
            return examples[i]
        raise DataError(f"index {i} is out of range for {len(examples)} problems")
    raise DataError("a completion needs an 'id' or an 'index' field naming its problem")
