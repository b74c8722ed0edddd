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
    fmt_x = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    for name in sorted(RESULTS.glob("decode_*.json")):
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
            rows.append([r["cache"], r["strategy"], r["iterations"], f"{r['ms_per_iteration']:.2f}",
                         f"{r['mean_equivalent_forwards']:.2f}", f"{cost:.3f}" if cost is not None else "-",
                         f"{r['positions_per_s']:.0f}", fmt_x(pos_x), fmt_x(ms_x),
                         fmt_x(r.get("flop_cost_per_iteration_vs_exact")), over, roof])
        timing = (f"{d['rounds']} alternating rounds, medians" if "rounds" in d else "consecutive repeats, medians")
        note = f"\n\n{d['note']}." if d.get("note") else (
            f"\n\nMeasured at commit {d['commit']}, before the planner head's restriction and cache: its "
            "equivalent forwards leave the heads out.")
        parts.append(f"`{name.name}`: {d['device']}, {d['model']} {d['dtype']}, B={d['batch']} P={d['prompt_len']} "
                     f"G={d['gen_len']} block={d['block']} ({timing}); original-work forward "
                     f"{d['full_logits_forward_ms']:.2f} ms, same-work forward {d['block_forward_ms']:.2f} ms "
                     f"(+planner {d['planner_forward_ms']:.2f} ms){note}\n\n"
                     + _table(["cache", "strategy", "iters", "ms/iter", "eq. full fwd", "cost/iter", "positions/s",
                               "positions/s vs exact", "ms/iter vs exact", "FLOP/iter vs exact", "loop overhead",
                               "of roofline"], rows))
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
                ("Continuous batching", continuous_tables()),
                ("Decode throughput sweep (8B shapes)", throughput_table()),
                ("Toy acceptance (GRPO with a step penalty)", toy_table()),
                ("Approximate caches on a trained model", cache_agreement_table()),
                ("Planned vs measured memory", memory_check_table())]
    for title, parts in sections:
        if parts:
            print(f"### {title}\n")
            print("\n\n".join(parts))
            print()


if __name__ == "__main__":
    main()
