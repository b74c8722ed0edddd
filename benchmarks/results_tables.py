"""Render the README's results tables (markdown) from the JSON files in benchmarks/results/.

    python benchmarks/results_tables.py            # prints markdown; paste into README.md "Results"
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def decode_tables() -> list[str]:
    parts = []
    for name in sorted(RESULTS.glob("decode_*.json")):
        d = json.loads(name.read_text())
        base = {r["strategy"]: r["positions_per_s"] for r in d["rows"] if r["cache"] == "none"}
        rows = []
        for r in d["rows"]:
            speedup = r["positions_per_s"] / base[r["strategy"]] if r["strategy"] in base else float("nan")
            roof = f"{r['fraction_of_roofline']:.0%}" if r.get("fraction_of_roofline") is not None else "-"
            over = f"{r['loop_overhead']:+.1%}" if r.get("loop_overhead") is not None else "-"
            rows.append([r["cache"], r["strategy"], r["iterations"], f"{r['ms_per_iteration']:.2f}",
                         f"{r['mean_equivalent_forwards']:.2f}", f"{r['positions_per_s']:.0f}", f"{speedup:.2f}x",
                         over, roof])
        parts.append(f"`{name.name}`: {d['device']}, {d['model']} {d['dtype']}, B={d['batch']} P={d['prompt_len']} "
                     f"G={d['gen_len']} block={d['block']}; full-logits forward {d['full_logits_forward_ms']:.2f} ms, "
                     f"same-work forward {d['block_forward_ms']:.2f} ms (+planner {d['planner_forward_ms']:.2f} ms)\n\n"
                     + _table(["cache", "strategy", "iters", "ms/iter", "eq. full fwd", "positions/s", "vs exact",
                               "loop overhead", "of roofline"], rows))
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
                         f"{r['fraction_of_roofline']:.0%}", d["device"]])
    return [_table(["B x L", "attention", "ms/forward", "+planner", "roofline ms", "of roofline", "device"], rows)]


def toy_table() -> list[str]:
    d = _load("toy_acceptance.json")
    if d is None:
        return []
    rows = [[r["method"], f"{r['accuracy']:.1%}", f"{r['nfe']:.2f}", f"{r['tpf']:.2f}"] for r in d["rows"]]
    return [f"`toy_acceptance.json` ({d['machine']}, {d['wall_s']:.0f} s): NFE cut {d['nfe_cut']:.0%}, accuracy "
            f"change {d['accuracy_change']:+.1%}, passed={d['passed']}\n\n"
            + _table(["method", "accuracy", "NFE", "TPF"], rows)]


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
                     "yes" if all(d["fits"].values()) else "NO"])
        notes.add(f"{d['layers']['method']}; {d['machine']['cpu']}, jax {d['machine']['jax']}")
        if "search" in d:
            sr = d["search"]
            ts, ro = sr["train_step"], sr["rollout"]
            best = ts["largest_micro_batch_rows"]
            search_rows.append([cfg, "-" if best is None else f"{best} ({best // sr['quantum_rows']}/dev)",
                                ro.get("sharded", {}).get("largest_rows", "-"),
                                ro.get("replicated_bf16", {}).get("largest_rows", "-")])
    if not rows:
        return []
    header = ["config", "mesh", "train step GiB/dev", "of it temp", "micro-batch rows", "S",
              "rollout sharded GiB/dev (+ state)", "rollout replicated bf16 GiB/dev (+ state)", "fits H200 -10%"]
    parts = [f"`memory_plan_*.json` ({'; '.join(sorted(notes))})\n\n" + _table(header, rows)]
    if search_rows:
        parts.append("Largest that fit (H200, 10% margin), `--search`:\n\n" + _table(
            ["config", "train micro-batch rows", "rollout rows (sharded)", "rollout rows (replicated bf16)"],
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
    return [f"`throughput_llada-8b_h200.json`: {d['device']}, random LLaDA-8B weights, bf16, P={d['prompt_len']} "
            f"G={d['gen_len']}, loop capped at {d['max_iterations']} iterations\n\n"
            + _table(["B", "block", "strategy", "ms/iteration", "of roofline", "positions/s"], rows)]


def main() -> None:
    sections = [("Forward vs roofline", forward_tables()), ("Decoding per cache mode", decode_tables()),
                ("Decode throughput sweep (8B shapes)", throughput_table()),
                ("Toy acceptance (GRPO with a step penalty)", toy_table()),
                ("Approximate caches on a trained model", cache_agreement_table()),
                ("Replay memory vs recorded iterations", replay_memory_table()),
                ("Memory plan of the shipped configs", memory_plan_tables()),
                ("Planned vs measured memory", memory_check_table())]
    for title, parts in sections:
        if parts:
            print(f"### {title}\n")
            print("\n\n".join(parts))
            print()


if __name__ == "__main__":
    main()
