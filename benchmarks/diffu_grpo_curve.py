"""d1's diffu-GRPO on the demo's SFT model: the reward curve and held-out accuracy before/after (CPU).

    dultra demo --out runs/demo                                   # once: the SFT stage is the starting point
    python benchmarks/diffu_grpo_curve.py --sft runs/demo/sft/model [--steps 40]

The trainer's own run (``configs/diffu_grpo_tiny.yaml``: threshold-0.9 rollouts as plain LLaDA, the one-step
estimate with 15% prompt masking, mu = 4 updates per rollout, beta = 0.04) on the demo's task (additions up to
20), started from the demo's SFT model (its planner head unused). Every rollout's mean reward goes into the JSON
(the curve), and the held-out accuracy / NFE with threshold-0.9 decoding (what the rollouts use, through the
evaluation harness, i.e. ``dultra eval``) before training and every ``--eval-every`` updates. Writes
``benchmarks/results/diffu_grpo_curve.json`` and a PNG of the curve when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, commit, device_name, write_json  # noqa: E402

CONFIG = Path(__file__).parent.parent / "configs" / "diffu_grpo_tiny.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the demo's SFT model directory (runs/demo/sft/model)")
    ap.add_argument("--steps", type=int, default=40, help="optimiser updates (rollouts x mu)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--run-dir", default="runs/diffu_grpo_curve", help="the trainer's output directory (new)")
    ap.add_argument("--out", default=str(RESULTS / "diffu_grpo_curve.json"))
    args = ap.parse_args()

    from dultra_jax.training.config import load_run_config
    from dultra_jax.training.trainer import Trainer

    sft = Path(args.sft)
    if not (sft / "config.json").is_file():
        sys.exit(f"error: {sft} is not a model directory (no config.json); run `dultra demo --out runs/demo` first")
    run_dir = Path(args.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        sys.exit(f"error: {run_dir} is not empty; pass another --run-dir")
    cfg = load_run_config(CONFIG, [
        f"model.path={sft.absolute()}", "task.max_operand=20", f"task.num_eval={args.num_eval}",
        f"eval.num_examples={args.num_eval}", f"train.max_steps={args.steps}", f"train.batch_size={args.prompts}",
        "grpo.num_generations=8", f"train.eval_every={args.eval_every}", f"train.save_every={args.steps}",
        f"optim.learning_rate={args.learning_rate}"])
    trainer = Trainer(cfg, run_dir, progress=True)
    t0 = time.perf_counter()
    before = trainer.evaluate()
    trainer.run()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "reward_mean" in r]
    rollouts = [r for r in updates if r.get("iteration", 0) == 0]  # one row per rollout: its rewards
    evals = [{"step": 0, **before}] + [{"step": r["step"], **{k: r[k] for k in before}} for r in rows
                                        if "eval_accuracy" in r]
    curve = [{"step": r["step"], "reward_mean": r["reward_mean"], "reward_std": r.get("reward_std"),
              "frac_reward_zero_std": r.get("frac_reward_zero_std"), "kl": r.get("kl")} for r in rollouts]
    rewards = [c["reward_mean"] for c in curve]
    k = max(1, len(rewards) // 4)
    result = {
        "benchmark": "diffu_grpo_curve", "device": device_name(), "commit": commit(), "config": str(CONFIG.name),
        "start": "the demo's SFT model", "sft_model": str(sft), "steps": args.steps, "prompts": args.prompts,
        "generations": cfg.grpo.num_generations, "mu": cfg.grpo.num_iterations, "beta": cfg.grpo.beta,
        "learning_rate": args.learning_rate, "rollout": "threshold 0.9", "wall_s": round(wall, 1),
        "curve": curve, "evals": evals,
        "reward_first_quarter": float(np.mean(rewards[:k])), "reward_last_quarter": float(np.mean(rewards[-k:])),
        "accuracy_before": before["eval_accuracy"], "accuracy_after": evals[-1]["eval_accuracy"],
        "nfe_before": before["eval_nfe"], "nfe_after": evals[-1]["eval_nfe"],
        "note": f"{len(rewards)} rollouts of {args.prompts} prompts x {cfg.grpo.num_generations} completions; "
                f"held-out accuracy on {args.num_eval} problems, threshold-0.9 decoding",
    }
    print(f"{'step':>5} {'reward':>8} {'zero-std':>9}")
    for c in curve:
        print(f"{c['step']:5d} {c['reward_mean']:8.3f} {c['frac_reward_zero_std'] or 0:9.2f}")
    for e in evals:
        print(f"eval at step {e['step']}: accuracy {e['eval_accuracy']:.1%}, NFE {e['eval_nfe']:.2f}")
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c["step"] for c in curve], rewards, marker="o", label="rollout mean reward")
    ax.plot([e["step"] for e in evals], [e["eval_accuracy"] for e in evals], marker="s",
            label="held-out accuracy")
    ax.set_xlabel("optimiser update")
    ax.set_title("diffu-GRPO from the demo's SFT model (CPU)")
    ax.legend()
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
