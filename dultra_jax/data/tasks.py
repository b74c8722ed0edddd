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

from dultra_jax.answers import extract_hash_answer, parse_apps_io
from dultra_jax.data import prompts as P


class DataError(ValueError):
    """A dataset that cannot be loaded or lacks the columns a task needs; the message says what to fix."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "math" | "code"
    hub_id: str
    hub_config: str | None
    splits: dict[str, str]  # style -> default split
    columns: tuple[str, ...]  # required columns (the hub schema)


TASKS: dict[str, TaskSpec] = {
    "gsm8k": TaskSpec("gsm8k", "math", "openai/gsm8k", "main", {"train": "train", "eval": "test"},
                      ("question", "answer")),
    # Training uses ankner/math-500 (split "train"), evaluation HuggingFaceH4/MATH-500; same problems.
    "math500": TaskSpec("math500", "math", "ankner/math-500", None, {"train": "train", "eval": "test"},
                        ("problem",)),
    "dapo17": TaskSpec("dapo17", "math", "open-r1/DAPO-Math-17k-Processed", "en", {"train": "train", "eval": "train"},
                       ("prompt", "solution")),
    "apps": TaskSpec("apps", "code", "codeparrot/apps", None, {"train": "train", "eval": "test"},
                     ("question", "input_output")),
    "humaneval": TaskSpec("humaneval", "code", "openai/openai_humaneval", None, {"train": "test", "eval": "test"},
                          ("task_id", "prompt", "test", "entry_point")),
    "mbpp": TaskSpec("mbpp", "code", "google-research-datasets/mbpp", "full", {"train": "train", "eval": "test"},
                     ("task_id", "text", "test_list")),
}
EVAL_HUB_IDS = {"math500": "HuggingFaceH4/MATH-500"}


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
        return TASKS[self.task].kind if self.task in TASKS else "math"


def task_spec(name: str) -> TaskSpec:
    key = name.lower()
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[key]


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
        hub_id = EVAL_HUB_IDS.get(spec.name, spec.hub_id) if style == "eval" else spec.hub_id
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
def _messages(kind: str, style: str, prompt_mode: str, train_user: str, eval_user: str) -> tuple:
    if style == "train":
        system = P.math_system_prompt(prompt_mode) if kind == "math" else P.code_system_prompt(prompt_mode)
        return tuple(P.conversation(system, train_user))
    return ({"role": "user", "content": eval_user},)


def make_example(task: str, index: int, row: dict[str, Any], *, style: str = "train",
                 prompt_mode: str = "thinking") -> Example:
    """One hub-schema row -> :class:`Example` (prompt in ``style``)."""
    spec = task_spec(task)
    if style not in P.STYLES:
        raise DataError(f"unknown prompt style {style!r}; choose one of {P.STYLES}")
    meta = {k: v for k, v in row.items()}
    if spec.name == "gsm8k":
        q = str(row["question"])
        answer = extract_hash_answer(str(row["answer"]))
        if answer is None:
            raise DataError(f"gsm8k row {index}: answer has no '####' final answer")
        msgs = _messages("math", style, prompt_mode, q, P.math_eval_user_prompt(q))
        return Example(spec.name, index, f"gsm8k/{index}", q, msgs, answer=answer, metadata=meta)
    if spec.name in ("math500", "dapo17"):
        q = str(row["problem"] if spec.name == "math500" else row["prompt"])
        if spec.name == "math500":
            # The reward extracts the last \boxed{} of the reference, so `answer` and `solution` agree.
            answer = row.get("answer") if row.get("answer") not in (None, "") else row.get("solution")
            if answer in (None, ""):
                raise DataError(f"math500 row {index}: needs an 'answer' or 'solution' column")
        else:
            answer = str(row["solution"]).strip()
        ident = str(row.get("unique_id") or f"{spec.name}/{index}")
        msgs = _messages("math", style, prompt_mode, P.math_user_prompt(q), P.math_eval_user_prompt(q))
        return Example(spec.name, index, ident, q, msgs, answer=str(answer), metadata=meta)
    if spec.name == "apps":
        q = str(row["question"])
        io = parse_apps_io(row.get("input_output"))
        starter = row.get("starter_code") or ""
        user = P.apps_user_prompt(q, starter, prompt_mode if style == "train" else "non-thinking")
        msgs = _messages("code", style, prompt_mode, user, user)
        tests = {"kind": "apps", "input_output": row.get("input_output"), "fn_name": io["fn_name"]}
        ident = str(row.get("problem_id", f"apps/{index}"))
        return Example(spec.name, index, ident, q, msgs, tests=tests, metadata=meta)
    if spec.name == "humaneval":
        prompt = str(row["prompt"])
        user = P.humaneval_instruct_prompt(prompt)
        msgs = _messages("code", style, prompt_mode, user, user)
        tests = {"kind": "humaneval", "prompt": prompt, "test": row["test"], "entry_point": row["entry_point"]}
        return Example(spec.name, index, str(row["task_id"]), prompt, msgs, tests=tests, metadata=meta)
    if spec.name == "mbpp":
        text, test_list = str(row["text"]), list(row["test_list"])
        user = P.mbpp_instruct_prompt(text, test_list)
        msgs = _messages("code", style, prompt_mode, user, user)
        tests = {"kind": "mbpp", "test_list": test_list}
        return Example(spec.name, index, str(row["task_id"]), text, msgs, tests=tests, metadata=meta)
    raise DataError(f"no record builder for task {spec.name!r}")  # pragma: no cover - TASKS is closed


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
