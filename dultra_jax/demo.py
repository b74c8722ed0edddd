"""The end-to-end method on a CPU (tens of minutes on 2 cores; docs/demo.md): SFT -> planner pre-training ->
GRPO with a step penalty.

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

import numpy as np

from dultra_jax.atomic import write_atomic
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
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)  # the baselines' knobs, swept
    factors: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


SIZES = {
    "full": DemoSize(model=("d_model=128", "n_layers=4", "mlp_hidden_size=256"), sft_steps=1200, planner_steps=300,
                     grpo_steps=40, max_operand=20, num_eval=256),
    "small": DemoSize(model=("d_model=64", "n_layers=2", "mlp_hidden_size=128"), sft_steps=300, planner_steps=100,
                      grpo_steps=15, max_operand=4, num_eval=32, grpo_prompts=4, grpo_generations=4,
                      step_penalty_weight=1.0, thresholds=(0.5, 0.9), factors=(1.0, 4.0)),
}
GEN_LENGTH, BLOCK_LENGTH = 16, 8
STEP_PENALTY_SCALE = 8.0
DEFAULT_THRESHOLD, DEFAULT_FACTOR = 0.9, 1.0  # today's single baseline rows
# The original's GRPO rewards (docs/original.md §7): correctness 2.0 x weight 1.0; step penalty weight 0.1 x
# -(steps with a reveal)/50, i.e. -0.002 per step = 0.001 of a correct answer's reward.
ORIGINAL_REWARDS = {"correct_reward": 2.0, "step_penalty_weight": 0.1, "step_penalty_scale": 50.0,
                    "penalty_per_step_over_correct": 0.1 / 50.0 / 2.0}


def reward_weights(size: DemoSize) -> dict[str, float]:
    """The demo's GRPO reward weights beside the original's (the demo's penalty is far stronger, so a tiny model
    learns the trade-off in 40 steps)."""
    return {"correct_reward": 1.0, "exact_answer_weight": 1.0, "step_penalty_weight": size.step_penalty_weight,
            "step_penalty_scale": STEP_PENALTY_SCALE,
            "penalty_per_step_over_correct": size.step_penalty_weight / STEP_PENALTY_SCALE / 1.0,
            "original": ORIGINAL_REWARDS}


def _common(size: DemoSize, seed: int) -> list[str]:
    return [f"model.overrides.{kv}" for kv in size.model] + [
        "model.preset=tiny", "model.overrides.max_sequence_length=128", f"model.seed={seed}",
        "task.name=synthetic-addition", f"task.max_operand={size.max_operand}", f"task.num_eval={size.num_eval}",
        f"train.seed={seed}", f"sequence.gen_length={GEN_LENGTH}", f"eval.decode.gen_length={GEN_LENGTH}",
        f"eval.decode.block_length={BLOCK_LENGTH}", f"eval.num_examples={size.num_eval}", "train.keep=1",
    ]


def _stage(out: Path, name: str, overrides: list[str], progress: bool) -> Trainer:
    print(f"== {name}")
    trainer = Trainer(load_run_config(None, overrides), out / name, progress=progress)
    trainer.run()
    trainer.export()
    return trainer


def _evaluate(trainer: Trainer, label: str, strategy: str, **knob: float) -> dict[str, Any]:
    """One point on the held-out problems through the evaluation harness (what ``dultra eval`` computes)."""
    from dultra_jax.eval import harness

    e = trainer.cfg.eval
    settings = harness.EvalSettings.create(strategy=strategy, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH,
                                    batch_size=e.batch_size, **knob)
    s = harness.evaluate(trainer._current_model(), trainer.tokenizer, trainer.eval_examples[: e.num_examples],
                         settings, task=trainer.cfg.task.name, progress=False, warmup=False, plan=trainer.plan)
    return {"method": label, "accuracy": s["accuracy"], "nfe": s["mean_nfe"], "tpf": s["tpf"], "strategy": strategy,
            **knob}


def interpolate_accuracy(points: list[dict[str, Any]], nfe: float) -> dict[str, Any]:
    """A baseline's accuracy at ``nfe`` by linear interpolation along its sweep (sorted by NFE; points with the
    same NFE averaged); None outside the swept NFE range (no extrapolation)."""
    by: dict[float, list[float]] = {}
    for p in points:
        by.setdefault(float(p["nfe"]), []).append(float(p["accuracy"]))
    xs = sorted(by)
    ys = [float(np.mean(by[x])) for x in xs]
    inside = xs[0] <= nfe <= xs[-1]
    return {"accuracy": float(np.interp(nfe, xs, ys)) if inside else None, "nfe_range": [xs[0], xs[-1]],
            "note": None if inside else f"NFE {nfe:.2f} is outside the swept range [{xs[0]:.2f}, {xs[-1]:.2f}]"}


def run_demo(out: str | Path, *, seed: int = 0, size: str = "full", progress: bool = True) -> dict[str, Any]:
    """Run the three stages into ``out``; returns the summary (also written to ``out/summary.json``).

    ``rows``: planner before/after GRPO and the threshold (0.9) / factor (1.0) baselines; ``sweep``: each
    baseline over its knob on the same held-out problems; ``at_planner_nfe``: each baseline's accuracy
    interpolated at the GRPO planner's NFE (the accuracy gain at equal forwards); ``reward_weights``: the demo's
    and the original's.
    """
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
    before = _evaluate(planner, "planner_before_grpo", "planner")
    sweep = [_evaluate(planner, f"threshold t={t:g}", "threshold", threshold=float(t))
             for t in sorted(set(s.thresholds) | {DEFAULT_THRESHOLD})]
    sweep += [_evaluate(planner, f"factor f={f:g}", "factor", factor=float(f))
              for f in sorted(set(s.factors) | {DEFAULT_FACTOR})]
    grpo = _stage(out, "grpo", base + [
        f"model.path={out / 'planner' / 'model'}", "train.mode=grpo", f"train.max_steps={s.grpo_steps}",
        f"train.batch_size={s.grpo_prompts}", "train.micro_batches=2", f"grpo.num_generations={s.grpo_generations}",
        f"grpo.gen_length={GEN_LENGTH}", f"grpo.block_length={BLOCK_LENGTH}", "grpo.temperature=0.7",
        "grpo.scale_rewards=group", "grpo.advantage_min_clip=null",
        f"grpo.reward_weights={{exact_answer: 1.0, step_penalty: {s.step_penalty_weight}}}",
        f"grpo.step_penalty_scale={STEP_PENALTY_SCALE}", "optim.learning_rate=1e-4", "optim.weight_decay=0.0",
        f"train.save_every={s.grpo_steps}", f"train.eval_every={max(1, s.grpo_steps // 4)}"], progress)
    after = _evaluate(grpo, "planner_after_grpo", "planner")
    default = {("threshold", DEFAULT_THRESHOLD), ("factor", DEFAULT_FACTOR)}
    rows = [before, after] + [dict(r, method=r["strategy"]) for r in sweep
                              if (r["strategy"], r.get("threshold", r.get("factor"))) in default]
    at = {}
    for strategy in ("threshold", "factor"):
        curve = [r for r in sweep if r["strategy"] == strategy]
        point = interpolate_accuracy(curve, after["nfe"])
        gain = None if point["accuracy"] is None else after["accuracy"] - point["accuracy"]
        at[strategy] = {**point, "planner_accuracy": after["accuracy"], "planner_nfe": after["nfe"],
                        "planner_accuracy_gain": gain}
    for r in rows + sweep:
        r.update(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, size=size, seed=seed)
    summary = {"rows": rows, "sweep": sweep, "at_planner_nfe": at, "reward_weights": reward_weights(s),
               "num_eval": s.num_eval, "max_operand": s.max_operand, "size": size, "seed": seed}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_table(rows + sweep)
    for strategy, a in at.items():
        acc = "n/a (" + a["note"] + ")" if a["accuracy"] is None else f"{a['accuracy']:.1%}"
        print(f"{strategy} at the GRPO planner's NFE {after['nfe']:.2f}: accuracy {acc} vs planner "
              f"{after['accuracy']:.1%}")
    plot_path = _plot(summary, out)
    if plot_path:
        print(f"wrote {plot_path}")
    cut = 1.0 - after["nfe"] / before["nfe"] if before["nfe"] else 0.0
    print(f"GRPO changed planner NFE {before['nfe']:.2f} -> {after['nfe']:.2f} ({cut:+.0%} cut) and accuracy "
          f"{before['accuracy']:.1%} -> {after['accuracy']:.1%}")
    return summary


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':>20} {'accuracy':>9} {'NFE':>7} {'TPF':>7}")
    for r in rows:
        print(f"{r['method']:>20} {r['accuracy']:9.1%} {r['nfe']:7.2f} {r['tpf']:7.2f}")


def _plot(summary: dict[str, Any], out: Path) -> Path | None:
    try:
        from dultra_jax.eval.plot import demo_points, plot_accuracy_vs_nfe
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    plot_accuracy_vs_nfe(demo_points(summary), out, title="accuracy vs NFE: baseline sweeps and the planner")
    return out / "accuracy_vs_nfe.png"


def nfe_cut(rows: list[dict[str, Any]]) -> float:
    by = {r["method"]: r for r in rows}
    return 1.0 - by["planner_after_grpo"]["nfe"] / by["planner_before_grpo"]["nfe"]


__all__ = ["SIZES", "interpolate_accuracy", "nfe_cut", "print_table", "reward_weights", "run_demo"]
