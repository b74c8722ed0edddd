"""Decoding speed per strategy next to a bare jitted forward of the same shapes.

    python benchmarks/decode_throughput.py                           # the CPU config of the decoding issue
    python benchmarks/decode_throughput.py --model llada-8b --batch 1 --prompt-len 256 --gen-len 256 --block 32
    python benchmarks/decode_throughput.py --cache none,prefix,dual

Random weights (no download). For each cache mode and strategy: iterations, ms per iteration, positions/s
(generated canvas positions decoded per second, B * G / wall), NFE and FLOP-equivalent full forwards per row,
and, for the exact mode, the loop overhead per iteration against a bare forward doing the same model work
(backbone over the canvas + LM head on the block, + the planner head for the planner strategy) and the
fraction of the FLOP roofline (measured dense-matmul rate). Also the full-logits forward the original runs
every iteration. Table + JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    RESULTS,
    STRATEGY_ARGS,
    commit,
    device_name,
    matmul_rate,
    median_ms,
    model_config,
    random_model,
    random_prompts,
    time_decode,
    write_json,
)
from flax import nnx

from dultra_jax.checkpoints.hf import parse_dtype


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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-iterations", type=int, default=None,
                    help="cap the loop (ms/iteration stays exact; positions/s then counts the positions decoded)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    on_gpu = jax.default_backend() == "gpu"
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    cfg = model_config(args.model)
    b, p, g, bl = args.batch, args.prompt_len, args.gen_len, args.block
    length = p + g
    model = random_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    prompts = random_prompts(cfg, b, p)  # never MASK / end-of-text / pad
    canvas = jnp.asarray(np.concatenate([prompts, np.full((b, g), cfg.mask_token_id, np.int32)], axis=1))

    @jax.jit
    def full_forward(state, ids):  # what the original runs every iteration: logits for every position
        return nnx.merge(graphdef, state)(ids)[0]

    @jax.jit
    def block_forward(state, ids):  # the same model work as one of our baseline iterations
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(ids)
        return m.lm_logits(h[:, p:p + bl])

    @jax.jit
    def planner_forward(state, ids):  # ... and of a planner iteration
        m = nnx.merge(graphdef, state)
        h = m.hidden_states(ids)
        mask_index = ids == cfg.mask_token_id
        t = 1.0 - mask_index.mean(-1)
        return m.lm_logits(h[:, p:p + bl]), m.planner_logits(h, t, mask_index)

    full_ms = median_ms(full_forward, state, canvas, iters=5)
    block_ms = median_ms(block_forward, state, canvas, iters=5)
    plan_ms = median_ms(planner_forward, state, canvas, iters=5)
    rate = matmul_rate(dtype, 8192 if on_gpu else 1024, iters=10)
    n_block = 4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.mlp_hidden_size
    flops_iter = 2 * b * length * n_block * cfg.n_layers + 2 * b * bl * cfg.d_model * cfg.embedding_size
    flops_iter += 4 * b * length * length * cfg.d_model * cfg.n_layers
    flops_plan = 2 * b * length * (n_block + 4 * cfg.d_model * cfg.d_model) + 4 * b * length**2 * cfg.d_model
    rows = []
    combos = [(c.strip(), s.strip()) for c in args.cache.split(",") if c.strip()
              for s in args.strategies.split(",") if s.strip()]
    for cache, name in combos:
        kw = dict(STRATEGY_ARGS[name], gen_length=g, block_length=bl, rng=0, cache=cache,
                  max_iterations=args.max_iterations)
        _, wall, result = time_decode(model, prompts, kw, args.repeats)
        iters = int(result.iterations)
        ms_iter = 1e3 * wall / iters
        ref_ms = plan_ms if name.startswith("planner") else block_ms
        flops = flops_iter + (flops_plan if name.startswith("planner") else 0)
        exact = cache == "none"
        rows.append({
            "cache": cache, "strategy": name, "iterations": iters,
            "mean_nfe": float(np.mean(np.asarray(result.nfe))),
            "mean_equivalent_forwards": round(float(np.mean(np.asarray(result.equivalent_forwards))), 3),
            "tpf": float((np.asarray(result.generated) != cfg.mask_token_id).sum()) / b
            / float(np.mean(np.asarray(result.nfe))), "wall_s": round(wall, 4),
            "ms_per_iteration": round(ms_iter, 3),
            "positions_per_s": round(float((np.asarray(result.generated) != cfg.mask_token_id).sum()) / wall, 1),
            "vs_full_logits_forward": round(ms_iter / full_ms, 4),
            "same_work_forward_ms": round(ref_ms, 3) if exact else None,
            "loop_overhead": round(ms_iter / ref_ms - 1, 4) if exact else None,
            "roofline_ms_per_iteration": round(flops / rate * 1e3, 3) if exact else None,
            "fraction_of_roofline": round(flops / rate * 1e3 / ms_iter, 3) if exact else None,
        })
    result = {
        "benchmark": "decode_throughput", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "dtype": jnp.dtype(dtype).name, "batch": b, "prompt_len": p, "gen_len": g,
        "block": bl, "full_logits_forward_ms": round(full_ms, 3), "block_forward_ms": round(block_ms, 3),
        "planner_forward_ms": round(plan_ms, 3), "matmul_tflops": round(rate / 1e12, 3), "rows": rows,
    }
    print(f"{result['device']}  {args.model} {result['dtype']}  B={b} P={p} G={g} block={bl}  "
          f"full-logits forward {full_ms:.2f} ms  block forward {block_ms:.2f} ms  +planner {plan_ms:.2f} ms  "
          f"matmul {rate / 1e9:.0f} GFLOP/s")
    print(f"{'cache':>6} {'strategy':>13} {'iters':>6} {'NFE':>6} {'eq.fwd':>7} {'ms/iter':>8} {'pos/s':>9} "
          f"{'overhead':>9} {'roofline':>9}")
    base_pos = {r["strategy"]: r["positions_per_s"] for r in rows if r["cache"] == "none"}
    for r in rows:
        extra = (f"{r['loop_overhead']:9.1%} {r['fraction_of_roofline']:9.1%}" if r["cache"] == "none" else
                 f"{r['positions_per_s'] / base_pos[r['strategy']]:8.2f}x" if r["strategy"] in base_pos else "")
        print(f"{r['cache']:>6} {r['strategy']:>13} {r['iterations']:6d} {r['mean_nfe']:6.1f} "
              f"{r['mean_equivalent_forwards']:7.2f} {r['ms_per_iteration']:8.2f} {r['positions_per_s']:9.1f} {extra}")
    tag = args.cache.replace(",", "-")
    out = Path(args.out) if args.out else RESULTS / f"decode_{args.model}_b{b}_{tag}_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
