"""The toy acceptance run of the training issue: does GRPO with a step penalty cut NFE without losing accuracy?

    python benchmarks/toy_acceptance.py [--out runs/toy] [--seed 0]

Runs the full `dultra demo` pipeline (tiny LLaDA, built-in addition task: SFT -> planner pre-training -> GRPO)
on the CPU, then records into benchmarks/results/: `toy_acceptance.json` (before/after rows, NFE cut, accuracy
change, machine, wall time), `toy_grpo_metrics.jsonl` (the GRPO curve, one row per step) and
`toy_grpo_curve.png` (rollout NFE, accuracy and reward against the step). The JSON also holds the demo's baseline
sweeps (threshold and factor over their knobs), each baseline's accuracy interpolated at the GRPO planner's NFE,
and the demo's reward weights beside the original's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import jax

from dultra_jax.demo import nfe_cut, run_demo
from dultra_jax.eval.env import cpu_model, git_commit, git_dirty

RESULTS = Path(__file__).parent / "results"




def plot_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in metrics]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(steps, [r["nfe_mean"] for r in metrics], label="rollout NFE (T=0.7)")
    ev = [r for r in metrics if "eval_nfe" in r]
    a1.plot([r["step"] for r in ev], [r["eval_nfe"] for r in ev], "o-", label="eval NFE (greedy)")
    a1.set_xlabel("GRPO step")
    a1.set_ylabel("NFE per sample")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(steps, [r.get("accuracy", float("nan")) for r in metrics], label="rollout accuracy")
    a2.plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", label="eval accuracy")
    a2.plot(steps, [r["reward_mean"] for r in metrics], label="reward")
    a2.set_xlabel("GRPO step")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    code = (git_commit(), git_dirty())  # the code that runs (the checkout may move on during the run)
    t0 = time.perf_counter()
    summary = run_demo(out, seed=args.seed, size="full", progress=False)
    rows = summary["rows"]
    wall = time.perf_counter() - t0
    by = {r["method"]: r for r in rows}
    result = {
        "benchmark": "toy_acceptance", "machine": f"cpu ({platform.machine()}, {cpu_model()})",
        "cores": os.cpu_count(), "jax": jax.__version__, "commit": code[0], "dirty": code[1],
        "wall_s": round(wall, 1), "seed": args.seed, "rows": rows, "sweep": summary["sweep"],
        "at_planner_nfe": summary["at_planner_nfe"], "reward_weights": summary["reward_weights"],
        "num_eval": summary["num_eval"], "max_operand": summary["max_operand"],
        "nfe_cut": round(nfe_cut(rows), 4),
        "accuracy_change": round(by["planner_after_grpo"]["accuracy"] - by["planner_before_grpo"]["accuracy"], 4),
        "criterion": "NFE cut >= 30% with accuracy within 2 points (or better)",
    }
    result["passed"] = result["nfe_cut"] >= 0.30 and result["accuracy_change"] >= -0.02
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "toy_acceptance.json").write_text(json.dumps(result, indent=2))
    shutil.copy(out / "grpo" / "metrics.jsonl", RESULTS / "toy_grpo_metrics.jsonl")
    metrics = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    plot_curve(metrics, RESULTS / "toy_grpo_curve.png")
    shutil.copy(out / "accuracy_vs_nfe.png", RESULTS / "toy_accuracy_vs_nfe.png")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
