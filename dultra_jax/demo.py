"""The end-to-end method on a laptop CPU in minutes: SFT -> planner pre-training -> GRPO with a step penalty.

A tiny LLaDA learns small additions (built-in char tokenizer and task, nothing downloaded) with masked-diffusion
SFT; its planner head is pre-trained to imitate the Fast-dLLM factor rule; GRPO with correctness + step-penalty
rewards then teaches the planner to reveal more tokens per forward. Planner decoding is evaluated before and
after GRPO next to the threshold and factor baselines on held-out problems (accuracy, NFE, TPF). SFT uses label
smoothing so the tiny model's confidences stay below 1 like a real dLLM's, which keeps confidence-based
decoding conservative and leaves the planner something to learn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dultra_jax.training.config import load_run_config
from dultra_jax.training.trainer import Trainer


@dataclass(frozen=True)
class DemoSize:
    model: tuple[str, ...]
    sft_steps: int
    planner_steps: int
    grpo_steps: int
    max_operand: int
    num_eval: int
    grpo_prompts: int = 4
    grpo_generations: int = 8
    step_penalty_weight: float = 0.5  # x -(steps with a reveal)/8


SIZES = {
    "full": DemoSize(model=("d_model=128", "n_layers=4", "mlp_hidden_size=256"), sft_steps=1200, planner_steps=300,
                     grpo_steps=40, max_operand=20, num_eval=256),
    "small": DemoSize(model=("d_model=64", "n_layers=2", "mlp_hidden_size=128"), sft_steps=300, planner_steps=100,
                      grpo_steps=15, max_operand=4, num_eval=32, grpo_prompts=4, grpo_generations=4,
                      step_penalty_weight=1.0),
}
GEN_LENGTH, BLOCK_LENGTH = 16, 8


def _common(size: DemoSize, seed: int) -> list[str]:
    return [f"model.overrides.{kv}" for kv in size.model] + [
        "model.preset=tiny", "model.overrides.max_sequence_length=128", f"model.seed={seed}",
        "task.name=synthetic-addition", f"task.max_operand={size.max_operand}", f"task.num_eval={size.num_eval}",
        f"train.seed={seed}", f"sequence.gen_length={GEN_LENGTH}", f"eval.gen_length={GEN_LENGTH}",
        f"eval.block_length={BLOCK_LENGTH}", f"eval.num_examples={size.num_eval}", "train.keep=1",
    ]


def _stage(out: Path, name: str, overrides: list[str], progress: bool) -> Trainer:
    print(f"== {name}")
    trainer = Trainer(load_run_config(None, overrides), out / name, progress=progress)
    trainer.run()
    trainer.export()
    return trainer


def _evaluate(trainer: Trainer, strategy: str, label: str) -> dict[str, Any]:
    trainer.cfg.eval.strategy = strategy
    r = trainer.evaluate()
    return {"method": label, "accuracy": r["eval_accuracy"], "nfe": r["eval_nfe"],
            "tpf": r["eval_tpf"], "strategy": strategy}


def run_demo(out: str | Path, *, seed: int = 0, size: str = "full", progress: bool = True) -> list[dict[str, Any]]:
    """Run the three stages into ``out`` and return the summary rows (also written to ``out/summary.json``)."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)}")
    s = SIZES[size]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    base = _common(s, seed)
    sft = _stage(out, "sft", base + [
        "train.mode=sft", "sequence.label_smoothing=0.4", "train.batch_size=32", f"train.max_steps={s.sft_steps}",
        "optim.learning_rate=1e-3", "optim.schedule=cosine", f"optim.total_steps={s.sft_steps}",
        "optim.warmup_steps=50", "optim.weight_decay=0.0", f"train.save_every={s.sft_steps}"], progress)
    del sft
    planner = _stage(out, "planner", base + [
        f"model.path={out / 'sft' / 'model'}", "train.mode=planner", "train.batch_size=32",
        f"train.max_steps={s.planner_steps}", "optim.learning_rate=1e-3", "optim.weight_decay=0.0",
        "sequence.min_block=8", f"train.save_every={s.planner_steps}"], progress)
    rows = [_evaluate(planner, "planner", "planner_before_grpo"), _evaluate(planner, "threshold", "threshold"),
            _evaluate(planner, "factor", "factor")]
    grpo = _stage(out, "grpo", base + [
        f"model.path={out / 'planner' / 'model'}", "train.mode=grpo", f"train.max_steps={s.grpo_steps}",
        f"train.batch_size={s.grpo_prompts}", "train.micro_batches=2", f"grpo.num_generations={s.grpo_generations}",
        f"grpo.gen_length={GEN_LENGTH}", f"grpo.block_length={BLOCK_LENGTH}", "grpo.temperature=0.7",
        "grpo.scale_rewards=group", "grpo.advantage_min_clip=null",
        f"grpo.reward_weights={{exact_answer: 1.0, step_penalty: {s.step_penalty_weight}}}",
        "grpo.step_penalty_scale=8.0", "optim.learning_rate=1e-4", "optim.weight_decay=0.0",
        f"train.save_every={s.grpo_steps}", f"train.eval_every={max(1, s.grpo_steps // 4)}"], progress)
    rows.insert(1, _evaluate(grpo, "planner", "planner_after_grpo"))
    for r in rows:
        r.update(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, size=size, seed=seed)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out / "summary.json")
    print_table(rows)
    plot_path = _plot(rows, out)
    if plot_path:
        print(f"wrote {plot_path}")
    before, after = rows[0], rows[1]
    cut = 1.0 - after["nfe"] / before["nfe"] if before["nfe"] else 0.0
    print(f"GRPO changed planner NFE {before['nfe']:.2f} -> {after['nfe']:.2f} ({cut:+.0%} cut) and accuracy "
          f"{before['accuracy']:.1%} -> {after['accuracy']:.1%}")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':>20} {'accuracy':>9} {'NFE':>7} {'TPF':>7}")
    for r in rows:
        print(f"{r['method']:>20} {r['accuracy']:9.1%} {r['nfe']:7.2f} {r['tpf']:7.2f}")


def _plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in rows:
        ax.scatter(r["nfe"], 100 * r["accuracy"], s=40)
        ax.annotate(r["method"], (r["nfe"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("NFE (forwards per sample)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("synthetic addition: accuracy vs NFE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"accuracy_vs_nfe.{ext}", dpi=120)
    plt.close(fig)
    return out / "accuracy_vs_nfe.png"


def nfe_cut(rows: list[dict[str, Any]]) -> float:
    by = {r["method"]: r for r in rows}
    return 1.0 - by["planner_after_grpo"]["nfe"] / by["planner_before_grpo"]["nfe"]


__all__ = ["SIZES", "nfe_cut", "print_table", "run_demo"]
