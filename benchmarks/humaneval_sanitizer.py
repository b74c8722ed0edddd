"""HumanEval scoring rule check: which of the 164 canonical solutions pass under each sanitiser.

    python benchmarks/humaneval_sanitizer.py            # all 164 problems, 2 sandbox workers

Completion forms, each scored with the ``"original"`` sanitiser (the default, the original evaluation's rules)
and the ``"lenient"`` one (this project's earlier rule):

- ``body``: the canonical solution as a body continuation of the prompt;
- ``fenced``: ```` ```python\\n<prompt + solution>``` ```` (a whole function in a fence);
- ``fenced_prose``: the same with one line of prose inside the fence after the code.

Prints a table and writes benchmarks/results/humaneval_sanitizer.json (counts and the failing task ids).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

from dultra_jax.atomic import write_atomic
from dultra_jax.eval.env import git_commit
from dultra_jax.rewards.code import HUMANEVAL_SANITIZERS, CodeVerifier
from dultra_jax.rewards.sandbox import Sandbox, SandboxLimits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "humaneval" / "HumanEval.jsonl.gz"
OUT = Path(__file__).parent / "results" / "humaneval_sanitizer.json"
PROSE = "This function returns the expected result for every input."


def forms(problem: dict) -> dict[str, str]:
    whole = problem["prompt"] + problem["canonical_solution"]
    return {"body": problem["canonical_solution"], "fenced": f"```python\n{whole}```",
            "fenced_prose": f"```python\n{whole}\n{PROSE}\n```"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with gzip.open(DATA, "rt") as f:
        problems = [json.loads(line) for line in f]
    verifier = CodeVerifier(Sandbox(SandboxLimits(timeout_s=args.timeout_s, memory_mb=1024), workers=args.workers))
    rows = []
    t0 = time.perf_counter()
    for form in ("body", "fenced", "fenced_prose"):
        completions = [forms(p)[form] for p in problems]
        for rule in HUMANEVAL_SANITIZERS:
            results = verifier.score_humaneval(problems, completions, sanitizer=rule)
            failed = [p["task_id"] for p, r in zip(problems, results, strict=True) if not r.passed]
            rows.append({"form": form, "sanitizer": rule, "passed": len(problems) - len(failed),
                         "total": len(problems), "failed": failed})
    wall = time.perf_counter() - t0
    print(f"{'form':>13} {'sanitizer':>9} {'passed':>7}  failing")
    for r in rows:
        shown = ", ".join(r["failed"][:4]) + (f" (+{len(r['failed']) - 4})" if len(r["failed"]) > 4 else "")
        print(f"{r['form']:>13} {r['sanitizer']:>9} {r['passed']:>3}/{r['total']}  {shown}")
    result = {"benchmark": "humaneval_sanitizer", "machine": platform.machine(), "python": platform.python_version(),
              "commit": git_commit(), "data": str(DATA.relative_to(ROOT)), "prose_line": PROSE, "rows": rows,
              "wall_s": round(wall, 1)}
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
