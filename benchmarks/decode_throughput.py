"""Decoding speed per cache mode and strategy, timed in alternating rounds, next to bare jitted forwards.

    python benchmarks/decode_throughput.py                           # the CPU config of the decoding issue
    python benchmarks/decode_throughput.py --model llada-8b --batch 1 --prompt-len 256 --gen-len 256 --block 32
    python benchmarks/decode_throughput.py --cache none,prefix,dual --strategies planner,threshold

Random weights (no download). Every variant (cache mode x strategy) is compiled first, then timed in
``--rounds`` alternating rounds (one run of each variant per round) and the median is reported, because a
shared machine's speed drifts within minutes. Per variant: iterations, ms per iteration, positions/s
(generated canvas positions decoded per second, B * G / wall), NFE, FLOP-equivalent exact iterations
per row (LM and planner heads included) and their per-iteration cost, and against the exact (no-cache) run
of the same strategy: the positions/s ratio, the measured ms/iteration ratio and the FLOP cost ratio per
iteration. With random weights the reveal decisions (hence iteration counts and positions/s ratios) are
those of a random planner/LM, not of real decoding; per-iteration ratios are the comparable cost. For the
exact mode also the loop overhead against a bare forward doing the same model work and the fraction of the
FLOP roofline (measured dense-matmul rate); for every variant ms/iteration against the weight-bandwidth floor
(parameter bytes / measured memory bandwidth: the batch-1 bound on GPU); also the full-logits +
full-canvas-head forward the original runs every iteration. Table + JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    RESULTS,
    STRATEGY_ARGS,
    commit,
    device_name,
    loop_programs,
    matmul_rate,
    model_config,
    random_model,
    random_prompts,
    write_json,
)
from flax import nnx

from dultra_jax.checkpoints.hf import parse_dtype
from dultra_jax.decoding import generate
from dultra_jax.decoding import loop as decode_loop
from dultra_jax.decoding.cost import iteration_flops


def memory_bandwidth(n: int, iters: int = 10) -> float:
    """Measured bytes/s of a jitted elementwise pass over n float32s (one read + one write each)."""
    a = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * 4 * n / float(np.median(times))


def cached_programs(graphdef, state, canvas, mask_index, t, p: int, g: int, bl: int, modes, layer_loop: str):
    """{name: call} of the planner loop's own refresh and cached iteration (:func:`_common.loop_programs`) of
    each cache mode at block 0 on these weights and this canvas: what a cached iteration's time is made of."""
    if layer_loop == "unrolled":
        graphdef, state = decode_loop.unstacked_layers(graphdef, state)
    calls = {}
    for mode in modes:
        refresh, cached, _ = loop_programs(graphdef, batch=canvas.shape[0], prompt=p, gen=g, block_length=bl,
                                           mode=mode)
        cache = refresh(state, canvas, mask_index, t)[2]
        calls[f"refresh_{mode}"] = lambda refresh=refresh: refresh(state, canvas, mask_index, t)
        calls[f"window_{mode}"] = lambda cached=cached, cache=cache: cached(state, canvas, mask_index, t, cache,
                                                                            jnp.int32(p))
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu", help="cpu (the decoding issue's CPU config) | tiny | llada-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--strategies", default="planner,planner-topk,threshold,factor,fixed")
    ap.add_argument("--cache", default="none", help="comma-separated cache modes: none, prefix, dual")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median reported)")
    ap.add_argument("--max-iterations", type=int, default=None,
                    help="cap the loop (ms/iteration stays exact; positions/s then counts the positions decoded)")
    ap.add_argument("--layer-loop", default="scan", choices=("scan", "unrolled"),
                    help="DecodeConfig.layer_loop (unrolled: per-layer weight buffers, each read once in place)")
    ap.add_argument("--refresh", default="full", choices=("full", "suffix"),
                    help="DecodeConfig.refresh of the cached variants")
    ap.add_argument("--skip-bare", action="store_true",
                    help="do not time the dual planner's refresh and cached iteration bare (saves two compiles)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    on_gpu = jax.default_backend() == "gpu"
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    cfg = model_config(args.model)
    b, p, g, bl = args.batch, args.prompt_len, args.gen_len, args.block
    length = p + g
    model = random_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    prompts = random_prompts(cfg, b, p)  # never MASK / end-of-text / pad
    canvas = jnp.asarray(np.concatenate([prompts, np.full((b, g), cfg.mask_token_id, np.int32)], axis=1))

    mask_index = canvas == cfg.mask_token_id
    t = 1.0 - mask_index.mean(-1)
    cols = jnp.broadcast_to(jnp.arange(p, p + bl), (b, bl))

    @jax.jit
    def full_forward(state, ids):  # what the original runs every iteration: logits and planner everywhere
        m = nnx.merge(graphdef, state)
        logits, h = m(ids)
        return logits, m.planner_logits(h, t, mask_index)

    @jax.jit
    def block_forward(state, ids):  # the same model work as one of our baseline iterations
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(ids)
        return m.lm_logits(h[:, p:p + bl])

    @jax.jit
    def planner_forward(state, ids):  # ... and of a planner iteration (the head's queries on the block)
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(ids)
        return m.lm_logits(h[:, p:p + bl]), m.planner_logits(h, t, mask_index, query_cols=cols)

    # dual only: its window is the block at every iteration (prefix's shrinks block by block)
    dual = ["dual"] if "dual" in [c.strip() for c in args.cache.split(",")] and not args.skip_bare else []
    bare = cached_programs(graphdef, state, canvas, mask_index, t, p, g, bl, dual, args.layer_loop)
    rate = matmul_rate(dtype, 8192 if on_gpu else 1024, iters=10, best=True)  # peak: robust to drift
    bandwidth = memory_bandwidth(2**28 if on_gpu else 2**24)
    weight_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state))
    floor_ms = 1e3 * weight_bytes / bandwidth  # every weight read once per iteration: the batch-1 floor
    combos = [(c.strip(), s.strip()) for c in args.cache.split(",") if c.strip()
              for s in args.strategies.split(",") if s.strip()]
    kws = {combo: dict(STRATEGY_ARGS[combo[1]], gen_length=g, block_length=bl, rng=0, cache=combo[0],
                       max_iterations=args.max_iterations, layer_loop=args.layer_loop,
                       refresh=args.refresh if combo[0] != "none" else "full") for combo in combos}
    results = {}
    for combo, kw in kws.items():  # compile (and one run) of every variant first
        results[combo] = generate(model, prompts, **kw)
        jax.block_until_ready(results[combo].tokens)
    forwards = {"full_logits_forward": (lambda: full_forward(state, canvas), []),
                "block_forward": (lambda: block_forward(state, canvas), []),
                "planner_forward": (lambda: planner_forward(state, canvas), []),
                **{name: (call, []) for name, call in bare.items()}}
    for fn, _ in forwards.values():
        jax.block_until_ready(fn())
    walls = {combo: [] for combo in combos}
    for _ in range(args.rounds):  # alternate: every variant once per round, so drift hits them alike
        for combo, kw in kws.items():
            t0 = time.perf_counter()
            jax.block_until_ready(generate(model, prompts, **kw).tokens)
            walls[combo].append(time.perf_counter() - t0)
        for fn, times in forwards.values():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
    fwd_ms = {k: 1e3 * float(np.median(v[1])) for k, v in forwards.items()}
    fwd_rounds = {k: 1e3 * np.asarray(v[1]) for k, v in forwards.items()}  # ms, one per round
    capped = args.max_iterations is not None
    blocks = g // bl
    rows, per_round = [], {}
    for cache, name in combos:
        result = results[(cache, name)]
        wall = float(np.median(walls[(cache, name)]))
        iters = int(result.iterations)
        ms_iter = 1e3 * wall / iters
        planner = name.startswith("planner")
        flops = iteration_flops(cfg, length, bl, planner, b)  # restricted head: queries on the block
        exact = cache == "none"
        if exact:  # the same model work as one iteration, called bare
            same = fwd_rounds["planner_forward" if planner else "block_forward"]
        elif planner and args.refresh == "full" and f"refresh_{cache}" in fwd_rounds:
            # the same programs called bare: a full refresh at each block's first iteration, windows after it
            same = (blocks * fwd_rounds[f"refresh_{cache}"] + (iters - blocks) * fwd_rounds[f"window_{cache}"]) / iters
        else:
            same = None
        nfe = np.asarray(result.nfe)
        decoded = float((np.asarray(result.generated) != cfg.mask_token_id).sum())
        ms_rounds = 1e3 * np.asarray(walls[(cache, name)]) / iters
        per_round[(cache, name)] = {"ms": ms_rounds, "pos": decoded / np.asarray(walls[(cache, name)]), "same": same}
        rows.append({
            "cache": cache, "strategy": name, "iterations": iters, "mean_nfe": float(np.mean(nfe)),
            "mean_equivalent_forwards": round(float(np.mean(np.asarray(result.equivalent_forwards))), 3),
            "cost_per_iteration": round(float(np.sum(np.asarray(result.equivalent_forwards)) / max(nfe.sum(), 1)), 4),
            "tpf": decoded / b / float(np.mean(nfe)), "wall_s": round(wall, 4),
            "wall_s_rounds": [round(w, 4) for w in walls[(cache, name)]],
            "ms_per_iteration": round(ms_iter, 3), "positions_per_s": round(decoded / wall, 1),
            "vs_full_logits_forward": round(ms_iter / fwd_ms["full_logits_forward"], 4),
            "same_work_forward_ms": round(float(np.median(same)), 3) if same is not None else None,
            "loop_overhead": round(float(np.median(ms_rounds / same)) - 1, 4) if same is not None else None,
            "roofline_ms_per_iteration": round(flops / rate * 1e3, 3) if exact else None,
            "fraction_of_roofline": round(flops / rate * 1e3 / ms_iter, 3) if exact else None,
            "vs_weight_bandwidth_floor": round(ms_iter / floor_ms, 3),
        })
    exact_rows = {r["strategy"]: r for r in rows if r["cache"] == "none"}

    def round_ratio(num, den) -> float | None:
        """Median over rounds of num/den: each round times every variant once, so the machine's drift cancels."""
        return None if num is None or den is None else round(float(np.median(num / den)), 3)

    for r in rows:
        e = exact_rows.get(r["strategy"])
        mine, ex = per_round[(r["cache"], r["strategy"])], per_round.get(("none", r["strategy"]))
        r["positions_per_s_vs_exact"] = round_ratio(mine["pos"], ex["pos"]) if e else None
        r["ms_per_iteration_vs_exact"] = round_ratio(ex["ms"], mine["ms"]) if e else None
        r["flop_cost_per_iteration_vs_exact"] = (round(e["cost_per_iteration"] / r["cost_per_iteration"], 3)
                                                 if e else None)
        # what the same programs called bare allow: the ceiling at this device's speed for each program's shapes
        # (a window's small matmuls run at a lower rate than the canvas's, which a FLOP ratio does not see)
        r["bare_programs_ceiling_vs_exact"] = (round_ratio(ex["same"], mine["same"])
                                               if e and r["cache"] != "none" else None)
    targets = {}
    if "planner" in exact_rows and "threshold" in exact_rows:
        targets["exact_planner_over_threshold_ms_per_iteration"] = round_ratio(
            per_round[("none", "planner")]["ms"], per_round[("none", "threshold")]["ms"])
        # what the head adds by FLOPs (queries and MLP on the block, keys/values over the canvas): the floor of
        # that ratio, here and at LLaDA-8B's shapes for the same canvas
        targets["exact_planner_over_threshold_flops"] = round(
            iteration_flops(cfg, length, bl, True, b) / iteration_flops(cfg, length, bl, False, b), 3)
        big = model_config("llada-8b")
        targets["exact_planner_over_threshold_flops_llada_8b"] = round(
            iteration_flops(big, length, bl, True, b) / iteration_flops(big, length, bl, False, b), 3)
    for r in rows:
        if r["strategy"] == "planner" and r["cache"] != "none" and "planner" in exact_rows:
            targets[f"{r['cache']}_planner_positions_per_s_vs_exact"] = r["positions_per_s_vs_exact"]
            targets[f"{r['cache']}_planner_ms_per_iteration_vs_exact"] = r["ms_per_iteration_vs_exact"]
    result = {
        "benchmark": "decode_throughput", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "dtype": jnp.dtype(dtype).name, "batch": b, "prompt_len": p, "gen_len": g,
        "block": bl, "rounds": args.rounds, "max_iterations": args.max_iterations,
        "layer_loop": args.layer_loop, "refresh": args.refresh,
        "full_logits_forward_ms": round(fwd_ms["full_logits_forward"], 3),
        "block_forward_ms": round(fwd_ms["block_forward"], 3),
        "planner_forward_ms": round(fwd_ms["planner_forward"], 3), "matmul_tflops": round(rate / 1e12, 3),
        "bare_cached_programs_ms": {k: round(v, 3) for k, v in fwd_ms.items() if k in bare},
        "memory_gb_per_s": round(bandwidth / 1e9, 1), "weight_bytes": weight_bytes,
        "weight_bandwidth_floor_ms": round(floor_ms, 3),
        "targets": targets, "rows": rows,
        "note": ("random weights: iteration counts and positions/s ratios follow a random model's reveal "
                 "decisions, not real decoding; per-iteration ratios (ms and FLOPs) are the comparable cost. "
                 + ("The loop was capped (--max-iterations): positions/s counts the positions decoded by the cap. "
                    if capped else "")
                 + f"Variants timed in {args.rounds} alternating rounds, medians reported (ratios: medians of the "
                 "ratios within each round, where a drift of the machine's speed cancels); "
                 + ("on a CPU machine shared with other jobs whose speed drifts" if not on_gpu else "on a GPU")),
    }
    print(f"{result['device']}  {args.model} {result['dtype']}  B={b} P={p} G={g} block={bl}  "
          f"original-work forward {fwd_ms['full_logits_forward']:.2f} ms  block forward "
          f"{fwd_ms['block_forward']:.2f} ms  +planner {fwd_ms['planner_forward']:.2f} ms  matmul {rate / 1e9:.0f} "
          f"GFLOP/s  ({args.rounds} alternating rounds, medians)")
    print(f"{'cache':>6} {'strategy':>13} {'iters':>6} {'NFE':>6} {'eq.fwd':>7} {'cost/it':>8} {'ms/iter':>8} "
          f"{'pos/s':>9} {'pos/s x':>8} {'ms/it x':>8} {'FLOP x':>7} {'overhead':>9}")
    for r in rows:
        fmt = lambda v: f"{v:7.2f}x" if v is not None else f"{'-':>8}"  # noqa: E731
        over = f"{r['loop_overhead']:9.1%}" if r["loop_overhead"] is not None else ""
        print(f"{r['cache']:>6} {r['strategy']:>13} {r['iterations']:6d} {r['mean_nfe']:6.1f} "
              f"{r['mean_equivalent_forwards']:7.2f} {r['cost_per_iteration']:8.3f} {r['ms_per_iteration']:8.2f} "
              f"{r['positions_per_s']:9.1f} {fmt(r['positions_per_s_vs_exact'])} {fmt(r['ms_per_iteration_vs_exact'])}"
              f"{fmt(r['flop_cost_per_iteration_vs_exact'])} {over}")
    print("targets:", json.dumps(targets))
    print("note:", result["note"])
    tag = args.cache.replace(",", "-") + ("" if args.layer_loop == "scan" else f"_{args.layer_loop}") + (
        "" if args.refresh == "full" else f"_refresh-{args.refresh}")
    out = Path(args.out) if args.out else RESULTS / f"decode_{args.model}_b{b}_{tag}_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
