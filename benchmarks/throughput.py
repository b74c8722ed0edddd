"""Decoding throughput with the FLOP roofline beside every figure, over a batch sweep.

    python benchmarks/throughput.py --model cpu --batches 1,4 --gen-len 64 --block 32          # CPU, minutes
    PYTHONPATH=. python3 benchmarks/throughput.py --model llada-8b --batches 1,8,32 --prompt-len 256 \\
        --gen-len 256 --block 32,128 --max-iterations 64                                          # one GPU

Random weights of the preset's shape (no download). For each batch size B, on a canvas [B, P + G]:

- ms per forward: the backbone with logits at every position (what the original runs every iteration), and
  with the planner head;
- for each block length and strategy: ms per decode iteration, positions/s (generated positions decoded per
  second; prompts are not counted), effective tokens/s (decoded tokens that are not end-of-text/pad), mean NFE
  and TPF.

Beside each figure: its roofline (the same FLOPs at the device's dense-matmul rate, the fastest of 20 timed
n x n x n matmuls; FLOPs = 2 x matmul parameters x positions + attention scores, the planner head per position)
and the fraction of it achieved.
``--max-iterations`` caps long loops (ms/iteration stays exact; throughput then counts the positions decoded).
Exact decoding (``--cache none``) has a roofline; cached modes report speed only. Table + JSON in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    RANDOM_MODELS,
    RESULTS,
    STRATEGY_ARGS,
    commit,
    device_name,
    matmul_params,
    matmul_rate,
    median_ms,
    model_config,
    random_model,
    random_prompts,
    time_decode,
    write_json,
)
from flax import nnx

from dultra_jax import accounting
from dultra_jax.checkpoints.hf import parse_dtype
from dultra_jax.decoding.cost import forward_flops, iteration_flops, planner_flops


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"{name} must be positive integers, got {text!r}")
    return values


def _roof(flops: float, rate: float) -> float:
    return flops / rate * 1e3


def _sig(x: float) -> float:
    """4 significant digits: a tiny model's roofline is microseconds, which fixed decimals would round away."""
    return float(f"{x:.4g}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu", choices=list(RANDOM_MODELS), help="random weights of this shape")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--block", default="32,128", help="block lengths, comma-separated")
    ap.add_argument("--strategies", default="planner,threshold,factor", help=f"of {list(STRATEGY_ARGS)}")
    ap.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per configuration (median)")
    ap.add_argument("--iters", type=int, default=10, help="timed forwards (median)")
    ap.add_argument("--max-iterations", type=int, default=None, help="cap the decoding loop")
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size for the rate (default 8192 GPU, 1024 CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput_<model>_<backend>)")
    args = ap.parse_args(argv)

    batches, blocks = _ints(args.batches, "--batches"), _ints(args.block, "--block")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGY_ARGS]
    if unknown or not strategies:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {list(STRATEGY_ARGS)}")
    p, g = args.prompt_len, args.gen_len
    bad = [bl for bl in blocks if g % bl]
    if bad:
        raise SystemExit(f"--gen-len {g} must be a multiple of every --block (not of {bad})")
    on_gpu = jax.default_backend() == "gpu"
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    cfg = model_config(args.model)
    if cfg.max_sequence_length < p + g:
        cfg = model_config(args.model, max_sequence_length=p + g)
    n = args.matmul_n or (8192 if on_gpu else 1024)
    rate = matmul_rate(dtype, n, best=True)
    model = random_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    counts = matmul_params(model)
    length = p + g
    special = accounting.model_excluded_ids(cfg)

    @jax.jit
    def full_forward(state, ids):  # the original's iteration: logits for every position
        return nnx.merge(graphdef, state)(ids)[0]

    @jax.jit
    def planner_forward(state, ids):
        m = nnx.merge(graphdef, state)
        logits, h = m(ids)
        mask_index = ids == cfg.mask_token_id
        return logits, m.planner_logits(h, 1.0 - mask_index.mean(-1), mask_index)

    forward_rows, decode_rows = [], []
    for b in batches:
        prompts = random_prompts(cfg, b, p)
        canvas = jnp.asarray(np.concatenate([prompts, np.full((b, g), cfg.mask_token_id, np.int32)], axis=1))
        f_flops = forward_flops(cfg, length, length, b)
        pl_flops = f_flops + planner_flops(cfg, length, b)
        fwd_ms = median_ms(full_forward, state, canvas, iters=args.iters)
        plan_ms = median_ms(planner_forward, state, canvas, iters=args.iters)
        forward_rows.append({
            "batch": b, "positions": b * length,
            "forward_ms": _sig(fwd_ms), "forward_roofline_ms": _sig(_roof(f_flops, rate)),
            "forward_fraction_of_roofline": _sig(_roof(f_flops, rate) / fwd_ms),
            "forward_planner_ms": _sig(plan_ms), "forward_planner_roofline_ms": _sig(_roof(pl_flops, rate)),
            "forward_planner_fraction_of_roofline": _sig(_roof(pl_flops, rate) / plan_ms),
        })
        for bl in blocks:
            for name in strategies:
                kw = dict(STRATEGY_ARGS[name], gen_length=g, block_length=bl, rng=0, cache=args.cache,
                          max_iterations=args.max_iterations)
                compile_s, wall, result = time_decode(model, prompts, kw, args.repeats)
                gen = np.asarray(result.generated)
                nfe = np.asarray(result.nfe)
                iters = int(result.iterations)
                decoded = gen != cfg.mask_token_id
                counted = accounting.account(gen, nfe, special, cfg.mask_token_id)
                effective = counted.effective_tokens
                ms_iter = 1e3 * wall / iters
                exact = args.cache == "none"
                roof_iter = _roof(iteration_flops(cfg, length, bl, name.startswith("planner"), b), rate)
                roof_wall = roof_iter * iters / 1e3
                decode_rows.append({
                    "batch": b, "block": bl, "strategy": name, "cache": args.cache, "iterations": iters,
                    "mean_nfe": float(nfe.mean()),
                    "tpf": counted.tpf,
                    "wall_s": round(wall, 6), "compile_and_first_run_s": round(compile_s, 2),
                    "ms_per_iteration": _sig(ms_iter),
                    "roofline_ms_per_iteration": _sig(roof_iter) if exact else None,
                    "fraction_of_roofline": _sig(roof_iter / ms_iter) if exact else None,
                    "positions_decoded": int(decoded.sum()),
                    "positions_per_s": round(float(decoded.sum()) / wall, 1),
                    "roofline_positions_per_s": round(float(decoded.sum()) / roof_wall, 1) if exact else None,
                    "effective_tokens": int(effective.sum()),
                    "effective_tokens_per_s": round(float(effective.sum()) / wall, 1),
                    "roofline_effective_tokens_per_s": round(float(effective.sum()) / roof_wall, 1) if exact else None,
                })
    result = {
        "benchmark": "throughput", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "dtype": jnp.dtype(dtype).name, "prompt_len": p, "gen_len": g, "blocks": blocks,
        "batches": batches, "cache": args.cache, "max_iterations": args.max_iterations, "matmul_n": n,
        "matmul_tflops": round(rate / 1e12, 4), "matmul_rate_rule": "fastest of 20 timed runs", "params": counts,
        "notes": "random weights; positions/s and effective tokens/s count generated positions only (prompt "
                 "excluded); roofline = same FLOPs at the measured matmul rate; compile excluded from timings",
        "forward": forward_rows, "decode": decode_rows,
    }
    print(f"{result['device']}  {args.model} {result['dtype']}  P={p} G={g}  matmul {rate / 1e12:.3f} TFLOP/s "
          f"(n={n})  commit {result['commit']}")
    print(f"{'B':>4} {'fwd ms':>9} {'roof ms':>9} {'of roof':>8} {'+planner ms':>12} {'roof ms':>9} {'of roof':>8}")
    for r in forward_rows:
        print(f"{r['batch']:>4} {r['forward_ms']:9.2f} {r['forward_roofline_ms']:9.2f} "
              f"{r['forward_fraction_of_roofline']:8.1%} {r['forward_planner_ms']:12.2f} "
              f"{r['forward_planner_roofline_ms']:9.2f} {r['forward_planner_fraction_of_roofline']:8.1%}")
    print(f"{'B':>4} {'block':>5} {'strategy':>13} {'iters':>6} {'NFE':>7} {'TPF':>6} {'ms/iter':>9} {'roof':>8} "
          f"{'of roof':>8} {'pos/s':>10} {'roof pos/s':>11} {'eff tok/s':>10} {'roof eff/s':>11}")
    for r in decode_rows:
        roof = (f"{r['roofline_ms_per_iteration']:8.2f} {r['fraction_of_roofline']:8.1%}" if r["fraction_of_roofline"]
                is not None else f"{'-':>8} {'-':>8}")
        rp = r["roofline_positions_per_s"]
        re_ = r["roofline_effective_tokens_per_s"]
        print(f"{r['batch']:>4} {r['block']:>5} {r['strategy']:>13} {r['iterations']:6d} {r['mean_nfe']:7.1f} "
              f"{r['tpf']:6.2f} {r['ms_per_iteration']:9.2f} {roof} {r['positions_per_s']:10.1f} "
              f"{rp if rp is not None else '-':>11} {r['effective_tokens_per_s']:10.1f} "
              f"{re_ if re_ is not None else '-':>11}")
    out = Path(args.out) if args.out else RESULTS / f"throughput_{args.model}_{jax.default_backend()}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
