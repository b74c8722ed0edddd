"""Render the README's results tables (markdown) from the JSON files in benchmarks/results/.

    python benchmarks/results_tables.py --write-all           # rewrites every generated block of README.md, docs/*.md
    python benchmarks/results_tables.py                       # prints the "Results" block
    python benchmarks/results_tables.py --section demo        # the "Demo" section's numbers
    python benchmarks/results_tables.py --section evaluation  # the "Evaluation" section's numbers
    python benchmarks/results_tables.py --write docs/serving.md  # the serving page's load table

tests/test_readme.py checks that every generated block of README.md and docs/*.md equals what this script
renders now.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


# Accelerator figures taken before decoding v2 (issue 16: unrolled per-layer weights, split cached attention);
# each is marked with its commit until benchmarks/gpu_session.sh re-measures it at the new code.
BEFORE_V2_COMMITS = ("1383f21", "b0df5fe")


def _before_v2(d: dict) -> str:
    """'' or ', commit X, measured before decoding v2' for an accelerator figure taken before decoding v2."""
    if d.get("commit") in BEFORE_V2_COMMITS and "cpu" not in str(d.get("device", "cpu")).lower():
        return f", commit {d['commit']}, measured before decoding v2"
    return ""


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def decode_tables() -> list[str]:
    parts = []
    fmt_x = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    for name in sorted(RESULTS.glob("decode_*.json")):
        if name.name.startswith("decode_bytes"):
            continue  # compile-time byte counts: kv_cache_tables
        d = json.loads(name.read_text())
        base = {r["strategy"]: r for r in d["rows"] if r["cache"] == "none"}
        rows = []
        for r in d["rows"]:
            e = base.get(r["strategy"])
            # older files lack the ratio fields: derive positions/s and ms/iteration ratios from the rows
            pos_x = r.get("positions_per_s_vs_exact", r["positions_per_s"] / e["positions_per_s"] if e else None)
            ms_x = r.get("ms_per_iteration_vs_exact", e["ms_per_iteration"] / r["ms_per_iteration"] if e else None)
            cost = r.get("cost_per_iteration")
            roof = f"{r['fraction_of_roofline']:.0%}" if r.get("fraction_of_roofline") is not None else "-"
            over = f"{r['loop_overhead']:+.1%}" if r.get("loop_overhead") is not None else "-"
            flop_x = r.get("flop_cost_per_iteration_vs_exact")
            # of the FLOP ceiling: the measured per-iteration speed-up over the exact mode / the FLOP ratio
            ceiling = f"{ms_x / flop_x:.0%}" if ms_x is not None and flop_x and r["cache"] != "none" else "-"
            rows.append([r["cache"], r["strategy"], r["iterations"], f"{r['ms_per_iteration']:.2f}",
                         f"{r['mean_equivalent_forwards']:.2f}", f"{cost:.3f}" if cost is not None else "-",
                         f"{r['positions_per_s']:.0f}", fmt_x(pos_x), fmt_x(ms_x), fmt_x(flop_x), ceiling,
                         fmt_x(r.get("bare_programs_ceiling_vs_exact")), over, roof])
        timing = (f"{d['rounds']} alternating rounds, medians" if "rounds" in d else "consecutive repeats, medians")
        note = f"\n\n{d['note']}." if d.get("note") else (
            f"\n\nMeasured at commit {d['commit']}, before the planner head's restriction and cache: its "
            "equivalent forwards leave the heads out.")
        loop = f", layer loop {d['layer_loop']}, refresh {d['refresh']}" if "layer_loop" in d else ""
        parts.append(f"`{name.name}`: {d['device']}{_before_v2(d)}, {d['model']} {d['dtype']}, B={d['batch']} "
                     f"P={d['prompt_len']} G={d['gen_len']} block={d['block']}{loop} ({timing}); original-work forward "
                     f"{d['full_logits_forward_ms']:.2f} ms, same-work forward {d['block_forward_ms']:.2f} ms "
                     f"(+planner {d['planner_forward_ms']:.2f} ms){note}\n\n"
                     + _table(["cache", "strategy", "iters", "ms/iter", "eq. full fwd", "cost/iter", "positions/s",
                               "positions/s vs exact", "ms/iter vs exact", "FLOP/iter vs exact",
                               "of FLOP ceiling", "bare programs' ceiling", "loop overhead", "of roofline"], rows))
    return parts


def continuous_tables() -> list[str]:
    parts = []
    for name in sorted(RESULTS.glob("continuous_batching_*.json")):
        d = json.loads(name.read_text())
        rows = [[r["slots"], r["generate_many_iterations"], r["batched_iterations"], f"{r['iterations_ratio']:.2f}x",
                 f"{r['generate_many_wall_s']:.2f}", f"{r['batched_wall_s']:.2f}", f"{r['wall_ratio']:.2f}x",
                 "yes" if r["same_tokens_and_nfe"] else "NO"] for r in d["rows"]]
        parts.append(f"`{name.name}`: {d['device']}, {d['model']} {d['dtype']}, {d['prompts']} prompts of "
                     f"{d['prompt_lengths'][0]}-{d['prompt_lengths'][1]} tokens, G={d['gen_len']} block={d['block']}, "
                     f"{d['strategy']}. {d['note']}.\n\n"
                     + _table(["slots", "generate_many iterations", "sync batches iterations", "fewer iterations",
                               "generate_many s", "sync batches s", "wall ratio", "same tokens and NFE"], rows))
    return parts


def engine_tables() -> list[str]:
    """The engine's continuous batching with a KV cache (docs/engine.md): iterations, wall time, host time."""
    parts = []
    for name in sorted(RESULTS.glob("engine_continuous_cache_*.json")):
        d = json.loads(name.read_text())
        rows = [[r["cache"], r["slots"], r["generate_many_iterations"], r["batched_iterations"],
                 f"{r['iterations_ratio']:.2f}x", f"{r['generate_many_wall_s']:.2f}", f"{r['batched_wall_s']:.2f}",
                 f"{r['wall_ratio']:.2f}x", "yes" if r["same_tokens_and_nfe"] else "NO", r["segments"],
                 f"{r['segment_ms']:.1f}", f"{r['host_ms_per_segment']:.2f}", f"{100 * r['host_fraction']:.2f}%"]
                for r in d["rows"]]
        parts.append(f"`{name.name}` (commit {d['commit']}): {d['device']}, {d['model']} {d['dtype']}, {d['prompts']} "
                     f"prompts of {d['prompt_lengths'][0]}-{d['prompt_lengths'][1]} tokens, G={d['gen_len']} "
                     f"block={d['block']}, {d['strategy']}. {d['note']}.\n\n"
                     + _table(["cache", "slots", "engine iterations", "sync batches iterations", "fewer iterations",
                               "engine s", "sync batches s", "wall ratio", "same tokens and NFE", "segments",
                               "ms / segment", "host ms / segment", "host / segment time"], rows))
    return parts


def forward_tables() -> list[str]:
    rows = []
    for name in sorted(RESULTS.glob("forward_*.json")):
        d = json.loads(name.read_text())
        for r in d["rows"]:
            if "error" in r:
                continue
            rows.append([f"{d['batch']} x {d['seq_len']}", r["attention_impl"], f"{r['forward_ms']:.1f}",
                         f"{r['forward_plus_planner_ms']:.1f}", f"{r['roofline_ms']:.1f}",
                         f"{r['fraction_of_roofline']:.0%}", d["device"] + _before_v2(d)])
    return [_table(["B x L", "attention", "ms/forward", "+planner", "roofline ms", "of roofline", "device"], rows)]


def _toy_files() -> list[Path]:
    """The current toy run first, then earlier ones kept under ``toy_acceptance_<commit>.json``."""
    return sorted(RESULTS.glob("toy_acceptance*.json"), key=lambda p: (p.name != "toy_acceptance.json", p.name))


def _toy_header(name: str, d: dict) -> str:
    where = d["machine"] + (f", jax {d['jax']}, commit {d['commit']}" if d.get("commit") else "")
    return (f"`{name}` ({where}, {d['wall_s']:.0f} s): NFE cut {d['nfe_cut']:.0%}, accuracy change "
            f"{d['accuracy_change']:+.1%}, passed={d['passed']}")


def toy_table() -> list[str]:
    parts = []
    for path in _toy_files():
        d = json.loads(path.read_text())
        rows = [[r["method"], f"{r['accuracy']:.1%}", f"{r['nfe']:.2f}", f"{r['tpf']:.2f}"] for r in d["rows"]]
        parts.append(_toy_header(path.name, d) + "\n\n" + _table(["method", "accuracy", "NFE", "TPF"], rows))
    return parts


def demo_sweep_tables() -> list[str]:
    """The demo's trade-off (from the newest toy run that has it): the baselines over their knobs, each one's
    accuracy interpolated at the GRPO planner's NFE, and the reward weights beside the original's."""
    d = next((json.loads(p.read_text()) for p in _toy_files() if "sweep" in json.loads(p.read_text())), None)
    if d is None:
        return []
    by = {r["method"]: r for r in d["rows"]}
    points = [[r["method"], f"{r['accuracy']:.1%}", f"{r['nfe']:.2f}", f"{r['tpf']:.2f}"]
              for r in sorted(d["sweep"], key=lambda r: (r["strategy"], r.get("threshold", r.get("factor", 0))))]
    points += [[m, f"{by[m]['accuracy']:.1%}", f"{by[m]['nfe']:.2f}", f"{by[m]['tpf']:.2f}"]
               for m in ("planner_before_grpo", "planner_after_grpo")]
    at = []
    for strategy, a in d["at_planner_nfe"].items():
        acc = "outside the swept NFE range" if a["accuracy"] is None else f"{a['accuracy']:.1%}"
        gain = "-" if a["planner_accuracy_gain"] is None else f"{a['planner_accuracy_gain']:+.1%}"
        at.append([strategy, f"{a['nfe_range'][0]:.2f}-{a['nfe_range'][1]:.2f}", f"{a['planner_nfe']:.2f}", acc,
                   f"{a['planner_accuracy']:.1%}", gain])
    w = d["reward_weights"]
    o = w["original"]
    weights = (f"Rewards: the demo's correctness reward is {w['correct_reward']:g} (weight "
               f"{w['exact_answer_weight']:g}) and its step penalty {w['step_penalty_weight']:g} x -(steps with a "
               f"reveal)/{w['step_penalty_scale']:g}, i.e. {w['penalty_per_step_over_correct']:.4f} of a correct "
               f"answer per step; the original's are {o['correct_reward']:g} (weight 1) and "
               f"{o['step_penalty_weight']:g} x -(steps)/{o['step_penalty_scale']:g}, i.e. "
               f"{o['penalty_per_step_over_correct']:.4f} per step: the demo's penalty is "
               f"{w['penalty_per_step_over_correct'] / o['penalty_per_step_over_correct']:.1f}x stronger, relative to "
               "correctness, so that a tiny model learns the trade-off in a few dozen steps.")
    n = f"{d['num_eval']} " if "num_eval" in d else ""
    return [f"`toy_acceptance.json` ({d['machine']}): the baselines swept on the same {n}held-out problems as the "
            "planner (threshold/factor on the planner-stage model)\n\n"
            + _table(["point", "accuracy", "NFE", "TPF"], points),
            "Each baseline's accuracy at the GRPO planner's NFE (linear interpolation along its sweep, never "
            "extrapolated):\n\n"
            + _table(["baseline", "swept NFE", "planner NFE", "baseline accuracy there", "planner accuracy",
                      "planner gain"], at),
            weights]


def tpf_tables() -> list[str]:
    """NFE / TPF distributions of the demo's models (``tokens_per_forward.py`` on the planner and GRPO stages)."""
    rows, meta = [], None
    for stage, name in (("planner stage", "tpf_demo-planner_synthetic-addition_cpu.json"),
                        ("after GRPO", "tpf_demo-grpo_synthetic-addition_cpu.json")):
        d = _load(name)
        if d is None:
            continue
        meta = d
        blocks = d["blocks"]
        by = {(r["strategy"], r["block"]): r for r in d["rows"]}
        for strategy in dict.fromkeys(r["strategy"] for r in d["rows"]):
            cells = [stage, strategy]
            for b in blocks:
                r = by.get((strategy, b))
                if r is None:
                    cells += ["-", "-", "-"]
                    continue
                n = r["nfe"]
                cells += [f"{n['mean']:.2f} / {n['p90']:.3g} / {n['max']:.0f}", f"{r['tpf']:.2f}",
                          f"{r.get('accuracy', float('nan')):.2f}"]
            rows.append(cells)
    if meta is None:
        return []
    header = ["model", "strategy"]
    for b in meta["blocks"]:
        header += [f"block {b}: NFE mean / p90 / max", "TPF", "acc"]
    return [f"`tpf_demo-*_synthetic-addition_cpu.json` ({meta['device']}, commit {meta['commit']}): "
            f"{meta['n_problems']} problems, gen {meta['gen_len']}, seed {meta['seed']}\n\n" + _table(header, rows)]


def eval_throughput_tables() -> list[str]:
    parts = []
    for path in sorted(RESULTS.glob("eval_throughput_*.json")):
        d = json.loads(path.read_text())
        if d.get("part") == "gpu":
            rows = [[r["slots"], f"{r['problems_per_s']:.2f}", f"{r['effective_tokens_per_s']:.0f}",
                     f"{r['mean_nfe']:.2f}"] for r in d["rows"]]
            parts.append(f"`{path.name}`: {d['device']}, {d['model']}\n\n"
                         + _table(["slots", "problems/s", "effective tokens/s", "NFE"], rows))
            continue
        rows = [[r["devices"], f"{r['problems_per_s']:.1f}", f"{r['effective_tokens_per_s']:.0f}",
                 f"{r['speedup_problems_per_s']:.2f}x", f"{r['mean_nfe']:.2f}", f"{r['tpf']:.2f}",
                 f"{r['accuracy']:.1%} +- {r.get('accuracy_std', 0.0):.1%}", f"{r['compile_and_warmup_s']:.1f}"]
                for r in d["rows"]]
        parts.append(f"`{path.name}`: {d['machine']}, {d['model']}, {d['problems']} problems x seeds "
                     f"{d['seeds']}, {d['strategy']} gen {d['gen_length']} block {d['block_length']}, batch "
                     f"{d['batch_size']}, commit {d['commit']}; {d['note']}\n\n"
                     + _table(["devices", "problems/s", "effective tokens/s", "vs 1 device", "NFE", "TPF",
                               "accuracy (seeds)", "compile s"], rows))
    return parts


def memory_plan_tables() -> list[str]:
    """benchmarks/memory_plan.py --config ... --out memory_plan_<config>.json: the trainer's programs per config."""
    gib = 1024**3
    rows, search_rows, notes = [], [], set()
    for name in sorted(RESULTS.glob("memory_plan_*.json")):
        d = json.loads(name.read_text())
        p, v = d["programs"], d.get("rollout_variants", {})
        t = p["train_step"]
        cfg = Path(d["config"]).name
        roll = {w: f"{r['per_device_bytes_with_training_state'] / gib:.1f} ({r['rows_per_device']}/dev)"
                for w, r in v.items()}
        steps = t.get("recorded_steps") or "-"
        rows.append([cfg, d["mesh"], f"{t['per_device_bytes'] / gib:.1f}", f"{t['temp_bytes'] / gib:.1f}",
                     f"{t['micro_batch_rows']} x {t['micro_batches']} ({t['rows_per_device']}/dev)", steps,
                     roll.get("sharded", "-"), roll.get("replicated_bf16", "-"),
                     "yes" if all(d["fits"].values()) else "NO", d["machine"]["commit"]])
        notes.add(f"{d['layers']['method']}; {d['machine']['cpu']}, jax {d['machine']['jax']}")
        if "search" in d:
            sr = d["search"]
            ts, ro = sr["train_step"], sr["rollout"]
            best = ts["largest_micro_batch_rows"]
            search_rows.append([cfg, "-" if best is None else f"{best} ({best // sr['quantum_rows']}/dev)",
                                ro.get("sharded", {}).get("largest_rows", "-"),
                                ro.get("replicated_bf16", {}).get("largest_rows", "-"), d["machine"]["commit"]])
    if not rows:
        return []
    header = ["config", "mesh", "train step GiB/dev", "of it temp", "micro-batch rows", "S",
              "rollout sharded GiB/dev (+ state)", "rollout replicated bf16 GiB/dev (+ state)", "fits H200 -10%",
              "commit"]
    parts = [f"`memory_plan_*.json` ({'; '.join(sorted(notes))})\n\n" + _table(header, rows)]
    if search_rows:
        parts.append("Largest that fit (H200, 10% margin), `--search`:\n\n" + _table(
            ["config", "train micro-batch rows", "rollout rows (sharded)", "rollout rows (replicated bf16)", "commit"],
            search_rows))
    return parts


def replay_memory_table() -> list[str]:
    """benchmarks/replay_memory.py: the replayed loss's gradient temporaries vs recorded iterations S."""
    docs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("replay_memory_*.json"))]
    if not docs:
        return []
    steps = sorted({r["steps"] for d in docs for r in d["rows"]})
    rows = []
    for d in docs:
        by = {r["steps"]: r["temp_bytes"] for r in d["rows"]}
        rows.append([d["label"], d["commit"]] + [f"{by[s] / 1e6:,.0f}" if s in by else "-" for s in steps]
                    + [f"{d['temp_bytes_per_step'] / 1e6:.1f}", f"{d['param_copies_per_step']:.3f}"])
    d = docs[0]
    return [f"`replay_memory_*.json`: AOT memory of jit(grad(grpo_loss)), {d['param_count']:,} parameters "
            f"({d['param_bytes'] / 1e6:.0f} MB fp32), B={d['batch']} P={d['prompt_len']} G={d['gen_len']}, "
            f"{d['device']}"
            "\n\n" + _table(["code", "commit"] + [f"temp MB at S={s}" for s in steps]
                             + ["MB per extra iteration", "parameter copies per iteration"], rows)]


def grpo_step_tables() -> list[str]:
    """benchmarks/grpo_step.py: one GRPO step per objective, and value_and_grad / forward of the replayed loss."""
    d = _load("grpo_step_both_cpu.json")
    if d is None:
        return []
    parts = []
    if d.get("grpo_step"):
        rows = [[r["size"], f"{r['params']:,}", r["loss"], r["rollout"], r["rows"], f"{r['recorded_steps']:.0f}",
                 f"{r['rollout_s']:.3f}", f"{r['rollout_tokens_per_s']:,.0f}", f"{r['train_s']:.3f}",
                 f"{r['train_tokens_per_s']:,.0f}"] for r in d["grpo_step"]]
        parts.append(f"`grpo_step_both_cpu.json`: {d['device']}, commit {d['commit']}, "
                     f"G={d['grpo_step'][0]['gen_length']}; {d['note']}\n\n" + _table(
                         ["model", "params", "grpo.loss", "rollout rule", "rows", "recorded S", "rollout s",
                          "rollout tokens/s", "train step s", "train tokens/s"], rows))
    if d.get("cost"):
        rows = [[r["trainable"], r["variant"], f"{r['flops_ratio']:.2f}x", f"{r['bytes_ratio']:.2f}x",
                 f"{r['cpu_s_ratio']:.2f}x", r["value_and_grad"]["transposes"], r["forward"]["transposes"]]
                for r in d["cost"]]
        m = d["cost_model"]
        parts.append(f"value_and_grad of the replayed loss against its forward, S={d['cost'][0]['steps']} recorded "
                     f"iterations, d_model={m['d_model']} n_layers={m['n_layers']} vocab={m['vocab_size']} (XLA cost "
                     "analysis of the compiled programs; CPU time = median process time)\n\n" + _table(
                         ["trainable", "loss", "FLOPs ratio", "bytes ratio", "CPU time ratio", "HLO transposes (grad)",
                          "HLO transposes (fwd)"], rows))
    return parts


def memory_check_table() -> list[str]:
    d = _load("gpu_memory_check.json")
    if d is None:
        return []
    gib = 1024**3
    rows = []
    for c in d.get("results", []):
        peak = (c.get("measured") or {}).get("peak_bytes_in_use")
        rows.append([c["case"], c["model"], c["batch"], f"{c['plan_cpu']['per_device_bytes'] / gib:.2f}",
                     f"{c['xla_estimate_this_device']['per_device_bytes'] / gib:.2f}",
                     "-" if peak is None else f"{peak / gib:.2f}", c["device"]])
    header = ["case", "model", "batch", "plan GiB (CPU AOT)", "XLA:GPU estimate GiB", "measured peak GiB", "device"]
    return [_table(header, rows)] if rows else []


def cache_agreement_table() -> list[str]:
    d = _load("cache_agreement.json")
    if d is None:
        return []
    rows = [[r["strategy"], r["cache"], f"{r['accuracy']:.1%}", f"{r['accuracy_change']:+.1%}",
             f"{r['token_agreement']:.1%}", f"{r['nfe']:.2f}", f"{r['equivalent_forwards']:.2f}"] for r in d["rows"]]
    return [f"`cache_agreement.json`: the demo's trained model, {d['num']} held-out problems, gen {d['gen_length']}, "
            f"block {d['block_length']}\n\n"
            + _table(["strategy", "cache", "accuracy", "vs exact", "token agreement", "NFE", "eq. full fwd"], rows)]


def throughput_table() -> list[str]:
    d = _load("throughput_llada-8b_h200.json")
    if d is None or "decode" not in d:
        return []
    rows = []
    for r in d["decode"]:
        rows.append([r["batch"], r["block"], r["strategy"], f"{r['ms_per_iteration']:.1f}",
                     f"{r['fraction_of_roofline']:.0%}", f"{r['positions_per_s']:.0f}"])
    return [f"`throughput_llada-8b_h200.json`: {d['device']}{_before_v2(d)}, random LLaDA-8B weights, bf16, "
            f"P={d['prompt_len']} G={d['gen_len']}, loop capped at {d['max_iterations']} iterations\n\n"
            + _table(["B", "block", "strategy", "ms/iteration", "of roofline", "positions/s"], rows)]


def humaneval_sanitizer_table() -> list[str]:
    d = _load("humaneval_sanitizer.json")
    if d is None:
        return []
    rows = [[r["form"], r["sanitizer"], f"{r['passed']}/{r['total']}", ", ".join(r["failed"][:3])
             + (f" (+{len(r['failed']) - 3})" if len(r["failed"]) > 3 else "")] for r in d["rows"]]
    return [f"`humaneval_sanitizer.json`: the 164 canonical solutions, commit {d['commit']}\n\n"
            + _table(["completion", "sanitizer", "passed", "failing"], rows)]


def cpu_throughput_table() -> list[str]:
    d = _load("throughput_cpu_cpu.json")
    if d is None:
        return []
    rows = [[r["batch"], r["strategy"], f"{r['ms_per_iteration']:.1f}", f"{r['fraction_of_roofline']:.0%}",
             f"{r['positions_per_s']:.0f}"] for r in d["decode"]]
    return [f"`throughput_cpu_cpu.json`: {d['device']}, random weights of the `{d['model']}` config, "
            f"{d['dtype']}, prompt {d['prompt_len']} + gen {d['gen_len']}, block {d['blocks'][0]}, matmul "
            f"{d['matmul_tflops']:.2f} TFLOP/s (measured while other jobs shared the machine), commit {d['commit']}"
            "\n\n" + _table(["B", "strategy", "ms/iteration", "of roofline", "positions/s"], rows)]


def _planner_over_threshold(d: dict, pl: dict, th: dict) -> str:
    t = d.get("targets", {}).get("exact_planner_over_threshold_ms_per_iteration")
    return f"{t if t is not None else pl['ms_per_iteration'] / th['ms_per_iteration']:.2f}x"


def _head_flops(d: dict) -> str:
    """The head's FLOP share, the floor of the planner/threshold ratio, where the JSON records it."""
    t = d.get("targets", {})
    if "exact_planner_over_threshold_flops" not in t:
        return ""
    return (f": by FLOPs it is {t['exact_planner_over_threshold_flops']:.2f}x on this 4-layer model and "
            f"{t['exact_planner_over_threshold_flops_llada_8b']:.2f}x at LLaDA-8B's shapes")


def summary_bullets() -> list[str]:
    """The Results section's summary, every figure read from the JSON files the tables below render."""
    out = []
    f1, f8 = _load("forward_llada-8b_b1_l512_h200.json"), _load("forward_llada-8b_b8_l512_h200.json")
    d32 = _load("decode_llada-8b_b32_h200.json")
    if f1 and f8 and d32:
        auto = {d: next(r for r in x["rows"] if r.get("attention_impl") == "auto") for d, x in ((1, f1), (8, f8))}
        ex = next(r for r in d32["rows"] if r["cache"] == "none" and r["strategy"] == "planner")
        out.append(f"- An 8B forward over 512 positions runs at {auto[1]['fraction_of_roofline']:.0%} of the matmul "
                   f"roofline at batch 1 and at {auto[8]['fraction_of_roofline']:.0%} at batch 8 "
                   f"(H200{_before_v2(f1)}); "
                   f"a decode iteration (B={d32['batch']}, P={d32['prompt_len']}, G={d32['gen_len']}) at "
                   f"{ex['fraction_of_roofline']:.0%}, with {ex['loop_overhead']:.1%} loop overhead (H200"
                   f"{_before_v2(d32)}).")
    cpu = _load("decode_cpu_b4_none-prefix-dual_cpu.json")
    if cpu:
        by = {(r["cache"], r["strategy"]): r for r in cpu["rows"]}
        base = ("threshold", "factor", "fixed")

        def span(cache):
            v = [by[(cache, b)]["positions_per_s_vs_exact"] for b in base if (cache, b) in by]
            lo, hi = f"{min(v):.1f}", f"{max(v):.1f}"
            return f"{lo}x" if lo == hi else f"{lo}-{hi}x"

        pl, th = by[("none", "planner")], by[("none", "threshold")]
        dp, pp = by[("dual", "planner")], by[("prefix", "planner")]
        out.append(f"- On the decoding issue's CPU config ({cpu['rounds']} alternating rounds, medians, on a shared "
                   f"2-core machine; random weights), an exact planner iteration costs "
                   f"{_planner_over_threshold(cpu, pl, th)} a threshold iteration (the head runs its "
                   f"queries and MLP on the block only){_head_flops(cpu)}; `dual` caching (backbone and head) decodes "
                   f"{dp['positions_per_s_vs_exact']:.1f}x the exact planner's positions per second "
                   f"({dp['flop_cost_per_iteration_vs_exact']:.1f}x fewer FLOPs per iteration) and {span('dual')} for "
                   f"the confidence baselines; `prefix` {pp['positions_per_s_vs_exact']:.1f}x (planner) and "
                   f"{span('prefix')} (baselines). The 8B GPU rows predate these changes (head uncached there).")
    sbs = _load("original_side_by_side_cpu_b4_cpu.json")
    if sbs:
        by = {r["variant"]: r for r in sbs["rows"]}
        named = [("exact", "exact"), ("dual", "`dual`"), ("dual_refresh_suffix", "`dual` with `refresh=suffix`")]
        parts = ", ".join(f"{label} {by[v]['vs_original']:.2f}x" for v, label in named if v in by)
        out.append(f"- Against the original's planner decoder in PyTorch (our port, token-identical on the golden "
                   f"fixture; same weights, prompts and coin flips, {sbs['rounds']} alternating rounds on the CPU "
                   f"config): {parts} the original's decoding speed.")
    cb = _load("continuous_batching_tiny_cpu.json")
    if cb:
        parts = ", ".join(f"{r['iterations_ratio']:.2f}x at {r['slots']} slots" for r in cb["rows"])
        same = all(r["same_tokens_and_nfe"] for r in cb["rows"])
        out.append(f"- Continuous batching (`generate_many`, {cb['prompts']} prompts of mixed lengths, random weights, "
                   f"Bernoulli planner) needs fewer batch iterations than sync batches of `generate`: {parts}"
                   + ("; identical tokens and NFE per prompt." if same else "."))
    toy = _load("toy_acceptance.json")
    if toy:
        by = {r["method"]: r for r in toy["rows"]}
        b, a = by["planner_before_grpo"], by["planner_after_grpo"]
        out.append(f"- Toy acceptance (`toy_acceptance.json`): GRPO with the step penalty cuts the planner's NFE "
                   f"{b['nfe']:.2f} -> {a['nfe']:.2f} ({toy['nfe_cut']:.0%}) while accuracy moves "
                   f"{b['accuracy']:.1%} -> {a['accuracy']:.1%}; the earlier run on another CPU is kept beside it "
                   "(the digits differ across CPUs, see \"Demo\").")
    plans = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("memory_plan_*.json"))]
    if plans:
        fit = sum(all(d["fits"].values()) for d in plans)
        worst = max(d["programs"]["train_step"]["per_device_bytes"] for d in plans) / 1024**3
        out.append(f"- Memory: {fit} of {len(plans)} shipped 8xH200 configs fit an H200 with a 10% margin by the plan "
                   f"of the trainer's own programs (largest train step {worst:.1f} GiB per GPU with the "
                   "recorded-iteration cap); the replayed loss's gradient holds O(1) parameter copies whatever the "
                   "number of recorded iterations (\"Replay memory\" below).")
    return ["Summary:\n\n" + "\n".join(out)] if out else []


def serve_load_tables() -> list[str]:
    parts = []
    for name in sorted(RESULTS.glob("serve_load_*.json")):
        d = json.loads(name.read_text())
        ms = lambda v: f"{1e3 * v:.0f}" if v is not None else "-"  # noqa: E731
        rows = [[r["requests"], f"{r['clients']} x {r['requests_per_client']}", f"{r['requests_per_s']:.1f}",
                 f"{r['tokens_per_s']:.0f}", ms(r["latency_p50_s"]), ms(r["latency_p99_s"]),
                 ms(r["first_chunk_p50_s"]), ms(r["first_chunk_p99_s"]), r["errors"],
                 f"{r['offline_tokens_per_s']:.0f}", f"{r['served_vs_offline']:.2f}x"] for r in d["rows"]]
        parts.append(f"`{name.name}`: {d['device']} ({d['cpu_count']} cores, 1-min load average "
                     f"{d['load_average_1min']:.1f}), {d['model']} {d['dtype']}, engine `{d['engine']}`, "
                     f"{d['slots']} slots, prompts of {d['prompt_lengths'][0]}-{d['prompt_lengths'][1]} tokens, "
                     f"G={d['gen_length']} block={d['block_length']}, {d['strategy']}, commit {d['commit']}; "
                     f"{d['note']}.\n\n"
                     + _table(["requests", "clients x requests", "req/s", "tokens/s", "p50 ms", "p99 ms",
                               "first chunk p50 ms", "first chunk p99 ms", "errors", "offline tokens/s",
                               "served / offline"], rows))
    return parts


def decode_bytes_table() -> list[str]:
    """docs/kv-cache.md: a cached iteration's bytes against the floor, before and after (decode_bytes.py)."""
    rows = []
    for label in ("before", "after"):
        d = _load(f"decode_bytes_llada-8b_{label}.json")
        if d is None:
            continue
        for r in d["rows"]:
            rows.append([f"{label} ({d['commit']}, {d['layer_loop']})", r["mode"], r["batch"], r["program"],
                         f"{r['bytes_accessed'] / 1e9:.1f}", f"{r['floor_bytes'] / 1e9:.1f}", f"{r['ratio']:.2f}x",
                         f"{r['flops'] / 1e12:.2f}"])
    if not rows:
        return []
    return ["`decode_bytes_llada-8b_{before,after}.json`: LLaDA-8B widths, float32, P=256 G=256 block 32; XLA:CPU "
            "cost analysis, compiled at 2 and 4 layers, extrapolated to 32\n\n"
            + _table(["code", "cache", "B", "program", "GB accessed", "GB floor", "vs floor", "TFLOP"], rows)]


def diffu_grpo_curve_table() -> list[str]:
    """docs/diffu-grpo.md: d1's objective from the demo's SFT model (benchmarks/diffu_grpo_curve.py)."""
    return [_diffu_grpo_curve({**json.loads(p.read_text()), "file": p.name})
            for p in sorted(RESULTS.glob("diffu_grpo_curve*.json"))]


def _diffu_grpo_curve(d: dict) -> str:
    rows = [[c["step"], f"{c['reward_mean']:.3f}", f"{c['reward_std']:.3f}",
             f"{c['frac_reward_zero_std']:.2f}" if c.get("frac_reward_zero_std") is not None else "-",
             f"{c['kl']:.4f}" if c.get("kl") is not None else "-"] for c in d["curve"]]
    evals = [[e["step"], f"{e['eval_accuracy']:.1%}", f"{e['eval_nfe']:.2f}"] for e in d["evals"]]
    return (f"`{d['file']}` ({d['device']}, commit {d['commit']}, {d['wall_s'] / 60:.0f} min): "
            f"`{d['config']}` from {d['start']}, {d['note']}; mu = {d['mu']}, beta = {d['beta']}, learning rate "
            f"{d['learning_rate']:g}. Mean reward {d['reward_first_quarter']:.3f} over the first quarter of the "
            f"rollouts -> {d['reward_last_quarter']:.3f} over the last; held-out accuracy "
            f"{d['accuracy_before']:.1%} -> {d['accuracy_after']:.1%} (NFE {d['nfe_before']:.2f} -> "
            f"{d['nfe_after']:.2f}).\n\n"
            + _table(["update", "rollout mean reward", "reward std", "groups with zero std", "KL"], rows)
            + "\n\n" + _table(["update", "held-out accuracy", "NFE"], evals))


def _machine_note(m: dict) -> str:
    """The wall-time context a cache_agreement JSON records: a note, or the load average when it started."""
    if "load_average_at_start" in m:
        return f"{m.get('cpus', '?')} CPUs, load average {m['load_average_at_start']} when it started"
    return m.get("note", "")


def refresh_agreement_table() -> list[str]:
    """docs/kv-cache.md: agreement, NFE and wall time per cache mode and refresh policy (cache_agreement.py)."""
    parts = []
    for name in ("cache_agreement_cpu.json", "cache_agreement.json"):
        d = _load(name)
        if d is None or not any("refresh" in r for r in d["rows"]):
            continue
        pct = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        rows = [[r["strategy"], r["cache"], r["refresh"], pct(r["accuracy"], ".1%"), f"{r['token_agreement']:.1%}",
                 pct(r.get("agreement_with_full_refresh"), ".1%"), f"{r['nfe']:.2f}",
                 f"{r['equivalent_forwards']:.2f}", f"{r['wall_s']:.2f}", f"{r['speedup_vs_exact']:.2f}x"]
                for r in d["rows"]]
        parts.append(f"`{name}`: {d['model']}, {d['num']} prompts, gen {d['gen_length']}, block {d['block_length']}, "
                     f"commit {d.get('commit', '?')}; {_machine_note(d.get('machine', {}))}\n\n"
                     + _table(["strategy", "cache", "refresh", "accuracy", "token agreement",
                               "agreement with full refresh", "NFE", "eq. full fwd", "wall s", "vs exact"], rows))
    return parts


def original_side_by_side_table() -> list[str]:
    """benchmarks/original_side_by_side.py: our planner decoders against the original's, in PyTorch."""
    parts = []
    for name in sorted(RESULTS.glob("original_side_by_side_*.json")):
        d = json.loads(name.read_text())
        fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
        rows = [[r["variant"], r["iterations"], f"{r['wall_s']:.3f}", f"{r['ms_per_iteration']:.2f}",
                 f"{r['vs_original']:.2f}x", f"{r['vs_original_per_iteration']:.2f}x",
                 fmt(r["agreement_with_original"]), fmt(r["agreement_with_dual"])] for r in d["rows"]]
        golden = "all passed" if all(v is True or (not isinstance(v, bool) and v <= 1e-4)
                                     for v in d["golden_checks"].values()) else "FAILED"
        parts.append(f"`{name.name}`: {d['device']}, torch {d['torch']} ({d['torch_threads']} threads) and jax "
                     f"{d['jax']}, commit {d['commit']}, {d['model']} {d['dtype']} B={d['batch']} P={d['prompt_len']} "
                     f"G={d['gen_len']} block={d['block']}; golden checks of the PyTorch port: {golden}. "
                     f"{d['note'][0].upper() + d['note'][1:]}. The PyTorch side is our port of the original's decoder "
                     "(written from docs/original.md; the original's repository is not reachable here), doing the "
                     "original's per-iteration work: logits at every position, the head over the whole canvas. "
                     "With random weights the cached variants' tokens part from exact decoding (a random model has "
                     "none of the locality a cache relies on); on the demo's trained model every cache and refresh "
                     "keeps >= 99.7% of exact decoding's tokens (docs/kv-cache.md, Refresh policies).\n\n"
                     + _table(["variant", "iterations", "wall s", "ms/iter", "vs original", "vs original per iteration",
                               "tokens as original", "tokens as dual"], rows))
    return parts


SECTIONS = {
    "summary": [],
    "results": [("Forward vs roofline", forward_tables), ("Decoding per cache mode", decode_tables),
                ("Against the original's PyTorch decoder", original_side_by_side_table),
                ("Continuous batching", continuous_tables),
                ("Decode throughput sweep (8B shapes)", throughput_table),
                ("Toy acceptance (GRPO with a step penalty)", toy_table),
                ("Approximate caches on a trained model", cache_agreement_table),
                ("Replay memory vs recorded iterations", replay_memory_table),
                ("Memory plan of the shipped configs", memory_plan_tables),
                ("Planned vs measured memory", memory_check_table)],
    "engine": [("Continuous batching with the KV cache", engine_tables)],
    "kv-cache": [("Bytes a cached iteration moves", decode_bytes_table),
                 ("Refresh policies", refresh_agreement_table)],
    "humaneval": [("HumanEval scoring rule: canonical solutions", humaneval_sanitizer_table)],
    "grpo": [("GRPO step and the replay gradient's cost on the CPU", grpo_step_tables),  # docs/diffu-grpo.md
             ("diffu-GRPO from the demo's SFT model", diffu_grpo_curve_table)],
    "demo": [("The demo's trade-off", demo_sweep_tables)],
    "evaluation": [("NFE and TPF of the demo's models", tpf_tables), ("Evaluation throughput", eval_throughput_tables),
                   ("Decoding throughput on the CPU", cpu_throughput_table)],
    "serving": [("Load on loopback (benchmarks/serve_load.py)", serve_load_tables)],  # docs/serving.md
}


def demo_time() -> str:
    """How long `dultra demo` took in the recorded runs (the full-size demo, from the toy acceptance JSON)."""
    runs = [json.loads(p.read_text()) for p in _toy_files()]
    if not runs:
        return ""
    walls = sorted(d["wall_s"] for d in runs)
    told = " and ".join(f"{w / 60:.0f} min" for w in walls)
    return (f"`dultra demo` took {told} in the recorded runs ({', '.join(sorted({d['machine'] for d in runs}))}; "
            "shared machines), so plan for half an hour on a small CPU.\n")


def render(section: str) -> str:
    """The markdown of one generated block (a section of the README or of a page in docs/)."""
    if section == "summary":
        return "".join(p + "\n" for p in summary_bullets())
    if section == "demo_time":
        return demo_time()
    out = []
    for title, fn in SECTIONS[section]:
        parts = fn()
        if parts:
            out.append(f"#### {title}\n\n" + "\n\n".join(parts) + "\n")
    return "\n".join(out)


BLOCKS = list(dict.fromkeys(["summary", "demo_time", *SECTIONS]))  # every generated block's section name
BEGIN = "<!-- generated: python benchmarks/results_tables.py --section {} -->\n"
END = "<!-- end generated -->\n"


def write_readme(path: Path) -> list[str]:
    """Replace every generated block of ``path`` (between ``BEGIN`` and ``END``) by :func:`render` of its
    section, atomically; returns the sections rewritten."""
    text = path.read_text()
    done = []
    for section in BLOCKS:
        begin = BEGIN.format(section)
        start = text.find(begin)
        if start < 0:
            continue
        stop = text.find(END, start)
        if stop < 0:
            raise SystemExit(f"{path}: the generated block of section {section!r} has no {END.strip()!r}")
        text = text[:start + len(begin)] + render(section) + text[stop:]
        done.append(section)
    if str(ROOT) not in sys.path:  # run as a script from anywhere: the package's atomic writer
        sys.path.insert(0, str(ROOT))
    from dultra_jax.atomic import write_atomic

    write_atomic(path, text)
    return done


def documents() -> list[Path]:
    """The files generated blocks may live in: README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def write_all() -> dict[str, list[str]]:
    """Rewrite every generated block of README.md and docs/*.md; returns the sections rewritten per file."""
    return {str(p.relative_to(ROOT)): done for p in documents() if (done := write_readme(p))}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="results", choices=sorted(BLOCKS), help="the block to print")
    ap.add_argument("--write", metavar="FILE", default=None,
                    help="rewrite every generated block of this file (all sections) instead of printing one")
    ap.add_argument("--write-all", action="store_true",
                    help="rewrite every generated block of README.md and docs/*.md")
    args = ap.parse_args(argv)
    if args.write_all:
        for name, done in write_all().items():
            print(f"{name}: rewrote {', '.join(done)}")
        return
    if args.write:
        print("rewrote sections:", ", ".join(write_readme(Path(args.write))))
        return
    print(render(args.section))


if __name__ == "__main__":
    main()
