"""Score completions produced elsewhere with the same extraction, verification and sandbox as training.

Input: a JSONL file, one object per completion, naming its problem by ``id`` (e.g. ``"HumanEval/0"``, an MBPP
``task_id``, an APPS ``problem_id``, a MATH500 ``unique_id``, ``"gsm8k/12"``) or ``index`` (position in the
dataset), with a ``completion`` string. Code completions may be bare programs or contain a fenced block.
Output (written atomically): ``samples.jsonl`` (one verdict per input line, in order) and ``summary.json``
(``accuracy`` = correct / scored, counts by status, and for GSM8K also the evaluation's numeric accuracy).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dultra_jax.atomic import write_atomic
from dultra_jax.data.tasks import DataError, Example, find_example, load_task, task_spec
from dultra_jax.outputs import check_results_dir
from dultra_jax.rewards import math as math_rewards


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
    spec = task_spec(task)
    rows = read_completions(completions_file)
    if examples is None:
        examples = load_task(spec.name, split=split, data_file=data_file, style="eval", apps_difficulties=None,
                             apps_call_based_only=False, cache_dir=cache_dir)
    problems = [find_example(examples, id=r.get("id"), index=r.get("index") if r.get("id") is None else None)
                for r in rows]
    completions = [r["completion"] for r in rows]
    samples: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if spec.kind == "math":
        from dultra_jax.rewards.procpool import MathVerifier

        with MathVerifier(workers=workers, timeout_s=math_timeout_s, mode=math_mode) as verifier:
            checks = verifier.check(completions, [p.answer for p in problems])
        for p, c, chk in zip(problems, completions, checks, strict=True):
            s = {"id": p.id, "index": p.index, "correct": chk["correct"], "reward": 2.0 if chk["correct"] else 0.0,
                 "status": "correct" if chk["correct"] else ("error" if chk["error"] else "wrong"),
                 "extracted": chk["extracted"], "reference": chk["reference"], "error": chk["error"]}
            if spec.name == "gsm8k":
                s["correct_numeric"] = math_rewards.gsm8k_eval_correct(c, p.answer or "")
            samples.append(s)
        if spec.name == "gsm8k":
            extra["accuracy_numeric"] = sum(s["correct_numeric"] for s in samples) / len(samples)
    else:
        from dultra_jax.rewards.code import APPS_TIMEOUT_S, HARNESS_TIMEOUT_S, CodeVerifier

        verifier = CodeVerifier(workers=workers, harness_timeout_s=code_timeout_s or HARNESS_TIMEOUT_S,
                                apps_timeout_s=code_timeout_s or APPS_TIMEOUT_S)
        tests = [dict(p.tests or {}) for p in problems]
        if spec.name == "humaneval":
            results = verifier.score_humaneval(tests, completions)
        elif spec.name == "mbpp":
            results = verifier.score_mbpp(tests, completions)
        else:
            results = verifier.score_apps(tests, completions)
        for p, r in zip(problems, results, strict=True):
            samples.append({"id": p.id, "index": p.index, "correct": r.passed, "reward": r.reward,
                            "status": r.status, "error": r.error, "tests_passed": r.tests_passed,
                            "tests_total": r.tests_total})
    n_correct = sum(bool(s["correct"]) for s in samples)
    summary = {
        "task": spec.name,
        "n": len(samples),
        "n_correct": n_correct,
        "accuracy": n_correct / len(samples),
        "n_problems": len({s["id"] for s in samples}),
        "counts": dict(Counter(s["status"] for s in samples)),
        **extra,
        "math_mode": math_mode if spec.kind == "math" else None,
        "data": str(data_file) if data_file else f"{spec.hub_id} (hub)",
        "completions_file": str(completions_file),
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
