"""Reward throughput on the CPU: sandboxed programs per second and math-verify checks per second.

    python benchmarks/reward_throughput.py                 # defaults: all 164 HumanEval, 500 GSM8K checks
    python benchmarks/reward_throughput.py --workers 8 --repeats 2

Programs: HumanEval canonical solutions (prompt + solution + test + check), each a fresh sandboxed interpreter,
``--workers`` at a time, with every isolation layer the kernel allows and with the audit hook alone. Checks:
GSM8K reference answers against completions (half correct, half another problem's answer) through the
time-bounded math-verify worker pool (both equivalence modes), plus one in-process main-thread baseline.
Prints a table and writes JSON to benchmarks/results/reward_throughput_<machine>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from dultra_jax.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
FIX = ROOT / "tests" / "fixtures"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"




def bench_sandbox(problems, workers: int, repeats: int, **isolation) -> dict:
    from dultra_jax.rewards.code import CodeVerifier
    from dultra_jax.rewards.sandbox import Sandbox, SandboxLimits

    sandbox = Sandbox(SandboxLimits(timeout_s=3.0), workers=workers, **isolation)
    verifier = CodeVerifier(sandbox)
    completions = [p["canonical_solution"] for p in problems]
    verifier.score_humaneval(problems[:4], completions[:4])  # warm the page cache
    times, passed, layers = [], 0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = verifier.score_humaneval(problems, completions)
        times.append(time.perf_counter() - t0)
        passed = sum(r.passed for r in res)
        layers = res[0].runs[0]["isolation"]
    best = min(times)
    return {"workers": workers, "programs": len(problems), "passed": passed, "seconds": round(best, 3),
            "programs_per_s": round(len(problems) / best, 2), "isolation": layers}


def bench_math(pairs, workers: int, mode: str) -> dict:
    from dultra_jax.rewards.procpool import MathVerifier

    comps, refs = zip(*pairs, strict=True)
    t_start = time.perf_counter()
    with MathVerifier(workers=workers, timeout_s=10.0, mode=mode) as v:
        v.rewards(list(comps[:workers]), list(refs[:workers]))  # start the workers (math-verify import)
        startup = time.perf_counter() - t_start
        t0 = time.perf_counter()
        rewards = v.rewards(list(comps), list(refs))
        dt = time.perf_counter() - t0
    return {"mode": mode, "workers": workers, "checks": len(pairs), "correct": int(sum(r > 0 for r in rewards)),
            "seconds": round(dt, 3), "checks_per_s": round(len(pairs) / dt, 1), "pool_startup_s": round(startup, 2)}


def bench_math_inprocess(pairs, mode: str) -> dict:
    from dultra_jax.rewards import math as M

    for c, r in pairs[:5]:
        M.check_answer(c, r, mode)  # imports and parser construction out of the timing
    t0 = time.perf_counter()
    ok = sum(M.check_answer(c, r, mode)["correct"] for c, r in pairs)
    dt = time.perf_counter() - t0
    return {"mode": mode, "workers": "in-process (main thread)", "checks": len(pairs), "correct": ok,
            "seconds": round(dt, 3), "checks_per_s": round(len(pairs) / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--humaneval", default=str(FIX / "humaneval" / "HumanEval.jsonl.gz"))
    ap.add_argument("--gsm8k", default=str(FIX / "gsm8k" / "test_sample.jsonl"), help="GSM8K JSONL (hub schema)")
    ap.add_argument("--checks", type=int, default=500, help="math-verify checks (GSM8K pairs, cycled)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/reward_throughput_<n>cpu.json)")
    args = ap.parse_args()

    from dultra_jax.answers import extract_hash_answer
    from dultra_jax.rewards.sandbox import namespaces_available

    with gzip.open(args.humaneval, "rt") if args.humaneval.endswith(".gz") else open(args.humaneval) as f:
        problems = [json.loads(line) for line in f]
    with open(args.gsm8k) as f:
        rows = [json.loads(line) for line in f]
    answers = [extract_hash_answer(r["answer"]) for r in rows]
    pairs = []
    for i in range(args.checks):
        a = answers[i % len(answers)]
        shown = a if i % 2 == 0 else answers[(i + 1) % len(answers)]
        pairs.append((f"<think>Let me compute.</think>\n<answer>\\boxed{{{shown}}}</answer>", a))

    sandbox_rows = [bench_sandbox(problems, args.workers, args.repeats)]
    if namespaces_available():
        sandbox_rows.append(bench_sandbox(problems, args.workers, args.repeats, namespaces=False))
    sandbox_rows.append(bench_sandbox(problems, 1, 1))
    math_rows = [bench_math(pairs, args.workers, "eval"), bench_math(pairs, args.workers, "faithful"),
                 bench_math_inprocess(pairs[:100], "eval")]

    print(f"{'sandbox: HumanEval canonical':<34} {'workers':>8} {'passed':>8} {'programs/s':>11}  isolation")
    for r in sandbox_rows:
        iso = "+".join(r["isolation"]["namespaces"]) or "none"
        iso += " ns, audit hook" if r["isolation"]["audit_hook"] else " ns"
        print(f"{'':<34} {r['workers']:>8} {r['passed']:>5}/{r['programs']:<3} {r['programs_per_s']:>10}  {iso}")
    print(f"{'math-verify: GSM8K pairs':<34} {'workers':>8} {'correct':>8} {'checks/s':>11}")
    for r in math_rows:
        print(f"{r['mode']:<34} {r['workers']!s:>8} {r['correct']:>4}/{r['checks']:<3} {r['checks_per_s']:>10}")

    from dultra_jax.eval.env import cpu_model

    out = Path(args.out) if args.out else RESULTS / f"reward_throughput_{os.cpu_count()}cpu.json"
    result = {
        "benchmark": "reward_throughput",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "commit": commit(),
        "sandbox_humaneval_canonical": sandbox_rows,
        "math_verify_gsm8k": math_rows,
    }
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
