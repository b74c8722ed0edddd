"""Task loaders: GSM8K, MATH500, DAPO-17k, APPS, HumanEval, MBPP as uniform :class:`Example` records.

Rows come from the Hugging Face hub through ``datasets`` (the original's dataset ids and splits), or from local
JSONL / JSON / parquet files with the hub's columns (``data_file``). Each record carries the prompt as a chat
conversation in the requested style (:mod:`dultra_jax.data.prompts`), the reference the reward compares
against (math) or the tests (code), and the row's other columns as metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dultra_jax.data import prompts as P


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
        """"math" | "code": which teacher and rewards apply (the synthetic addition task is arithmetic)."""
        from dultra_jax.tasks import get_task

        kind = get_task(self.task).kind
        return "math" if kind == "synthetic" else kind


def task_spec(name: str) -> TaskSpec:
    """The hub spec of a task read from the hub (:mod:`dultra_jax.tasks` is the table)."""
    from dultra_jax.tasks import get_task, task_names

    spec = get_task(name).hub
    if spec is None:
        raise DataError(f"task {name!r} is generated, not read from a dataset; hub tasks: "
                        f"{[n for n in task_names() if get_task(n).hub is not None]}")
    return spec


# ------------------------------------------------------------------------------------------- reading rows
def read_rows(
    task: str,
    *,
    split: str | None = None,
    data_file: str | Path | None = None,
    style: str = "train",
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Raw rows of a task: from ``data_file`` (JSONL/JSON/parquet, optionally gzipped) or the hub."""
    import datasets

    spec = task_spec(task)
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        name = path.name.lower()
        fmt = "parquet" if name.endswith(".parquet") else "json" if any(
            name.endswith(s) for s in (".jsonl", ".json", ".jsonl.gz", ".json.gz")) else None
        if fmt is None:
            raise DataError(f"unsupported data file {path}: use .jsonl, .json (optionally .gz) or .parquet")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train",
                                       cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for malformed files
            raise DataError(f"could not read {path} as {fmt}: {type(e).__name__}: {e}") from e
        source = str(path)
    else:
        hub_id = (spec.eval_hub_id or spec.hub_id) if style == "eval" else spec.hub_id
        split = split or spec.splits[style]
        try:
            ds = datasets.load_dataset(hub_id, spec.hub_config, split=split,
                                       cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"could not load {hub_id!r} (config {spec.hub_config!r}, split {split!r}) from the Hugging Face hub: "
                f"{type(e).__name__}: {e}. Download it elsewhere and pass --data-file with the hub's columns."
            ) from e
        source = f"{hub_id}:{split}"
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{source} lacks column(s) {missing} needed for task {spec.name!r} "
                        f"(has {ds.column_names}); local files must use the hub's schema")
    return [dict(r) for r in ds]


# ------------------------------------------------------------------------------------------- records
def make_example(task: str, index: int, row: dict[str, Any], *, style: str = "train",
                 prompt_mode: str = "thinking") -> Example:
    """One hub-schema row -> :class:`Example` (prompt in ``style``), by the task's row builder."""
    from dultra_jax.tasks import get_task

    t = get_task(task)
    if style not in P.STYLES:
        raise DataError(f"unknown prompt style {style!r}; choose one of {P.STYLES}")
    if t.from_row is None:
        raise DataError(f"task {t.name!r} is generated, it has no dataset rows")
    return t.from_row(index, row, style, prompt_mode)


def load_task(
    task: str,
    *,
    split: str | None = None,
    data_file: str | Path | None = None,
    style: str = "train",
    prompt_mode: str = "thinking",
    limit: int | None = None,
    apps_difficulties: Sequence[str] | None = ("introductory",),
    apps_call_based_only: bool | None = None,
    cache_dir: str | Path | None = None,
) -> list[Example]:
    """Records of ``task``. APPS for training keeps introductory, call-based problems, as the original does
    (``apps_call_based_only`` defaults to ``style == "train"``; ``apps_difficulties=None`` keeps all)."""
    spec = task_spec(task)
    rows = read_rows(spec.name, split=split, data_file=data_file, style=style, cache_dir=cache_dir)
    if spec.name == "apps":
        call_only = (style == "train") if apps_call_based_only is None else apps_call_based_only
        rows = [r for r in rows if _keep_apps(r, apps_difficulties, call_only)]
    if limit is not None:
        rows = rows[: int(limit)]
    return [make_example(spec.name, i, r, style=style, prompt_mode=prompt_mode) for i, r in enumerate(rows)]


def _keep_apps(row: dict[str, Any], difficulties: Sequence[str] | None, call_only: bool) -> bool:
    if difficulties is not None and "difficulty" in row and row["difficulty"] not in difficulties:
        return False
    io = row.get("input_output") or ""
    if call_only:
        return "fn_name" in (io if isinstance(io, str) else json.dumps(io))
    return bool(io)


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
