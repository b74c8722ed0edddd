"""Reading a task's rows (a local file or the hub) and turning them into :class:`~dultra_jax.data.tasks.Example`
records by the task's own row builder: the table (:mod:`dultra_jax.tasks.table`) knows each task's hub spec and
builder, :mod:`dultra_jax.data` only the records (so the table depends on data, never the other way)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dultra_jax.data import prompts as P
from dultra_jax.data.tasks import DataError, Example, TaskSpec


def task_spec(name: str) -> TaskSpec:
    """The hub spec of a task read from the hub (:mod:`dultra_jax.tasks` is the table)."""
    from dultra_jax.tasks.table import get_task, task_names

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
    from dultra_jax.tasks.table import get_task

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
