"""Score completions produced elsewhere with the same extraction, verification and sandbox as training.

Input: a JSONL file, one object per completion, naming its problem by ``id`` (e.g. ``"HumanEval/0"``, an MBPP
``task_id``, an APPS ``problem_id``, a MATH500 ``unique_id``, ``"gsm8k/12"``) or ``index`` (position in the
dataset), with a ``completion`` string. Code completions may be bare programs or contain a fenced block.
Output (written atomically): ``samples.jsonl`` (one verdict per input line, in order) and ``summary.json``
(``accuracy`` = correct / scored, counts by status). "Correct" is the task's one definition
(:attr:`dultra_jax.tasks.Task.score`), the same ``dultra eval`` counts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dultra_jax.atomic import write_atomic
from dultra_jax.data.tasks import DataError, Example, find_example
from dultra_jax.outputs import check_results_dir
from dultra_jax.tasks import Verifiers, get_task


def read_completions(path: str | Path) -> list[dict[str, Any]]:
    """Validated rows of a completions JSONL file (clear errors naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"completions file not found: {path}")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise DataError(f"{path}:{lineno}: needs a 'completion' string field")
        if row.get("id") is None and row.get("index") is None:
            raise DataError(f"{path}:{lineno}: needs an 'id' or 'index' field naming the problem")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no completions")
    return rows




def score_completions(
    task: str,
    completions_file: str | Path,
    *,
    data_file: str | Path | None = None,
    split: str | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    math_mode: str = "eval",
    workers: int | None = None,
    math_timeout_s: float = 10.0,
    code_timeout_s: float | None = None,
    cache_dir: str | Path | None = None,
    examples: list[Example] | None = None,
) -> dict[str, Any]:
    """Score every completion; returns the summary (and writes the files when ``out_dir`` is given; results
    already there are refused unless ``overwrite``)."""
    if out_dir is not None:
        check_results_dir(out_dir, ("samples.jsonl", "summary.json"), overwrite=overwrite)
    t0 = time.perf_counter()
    t = get_task(task, "score")
    rows = read_completions(completions_file)
    if examples is None:
        examples = t.examples("eval", split=split, data_file=data_file, cache_dir=cache_dir, apps_difficulties=None,
                              apps_call_based_only=False)  # every problem of the split is scorable
    problems = [find_example(examples, id=r.get("id"), index=r.get("index") if r.get("id") is None else None)
                for r in rows]
    completions = [r["completion"] for r in rows]
    with Verifiers(workers=workers, math_mode=math_mode, math_timeout_s=math_timeout_s,
                   code_timeout_s=code_timeout_s) as verifiers:
        verdicts = t.score(verifiers, problems, completions)
    samples = [{"id": p.id, "index": p.index, **v} for p, v in zip(problems, verdicts, strict=True)]
    n_correct = sum(bool(s["correct"]) for s in samples)
    summary = {
        "task": t.name,
        "n": len(samples),
        "n_correct": n_correct,
        "accuracy": n_correct / len(samples),
        "n_problems": len({s["id"] for s in samples}),
        "counts": dict(Counter(s["status"] for s in samples)),
        "correct_means": t.correct_means,
        "math_mode": math_mode if t.kind == "math" else None,
        "data": str(data_file) if data_file else f"{t.hub.hub_id} (hub)",
        "completions_file": str(completions_file),
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
