"""Continuous batching (``generate_many``) against batches of ``generate`` (sync schedule), same prompts.

    python benchmarks/continuous_batching.py                      # 256 prompts, slots 8 and 32, CPU config
    python benchmarks/continuous_batching.py --model tiny --prompts 64 --slots 8

Random weights with Bernoulli planner reveals (no download), so NFE per block varies from row to row as it
does with a trained planner (by how much is the random model's, not a trained one's). Prompts of mixed lengths
(uniform in [--min-len, --max-len]). The baseline decodes the prompts in input order, ``slots`` at a time,
each batch left-padded (padding-aware) to a geometric bucket width (:func:`bucket_width`), so both compile a
few loops only; both are run once to compile and then timed. Reports batch iterations (loop forwards),
wall time and their ratios, and checks that every prompt's tokens and NFE agree between the two. Table +
JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import RESULTS, commit, device_name, model_config, random_model, write_json

from dultra_jax.checkpoints.hf import parse_dtype
from dultra_jax.decoding import generate, generate_many
from dultra_jax.decoding.continuous import bucket_width
from dultra_jax.decoding.loop import pad_id_of, pad_prompts


def batched(model, prompts, slots, kw):
    """Batches of ``slots`` prompts in input order through ``generate`` (sync): (tokens, nfe, iterations)."""
    cfg = model.cfg
    tokens, nfe, iterations = [], [], 0
    for s in range(0, len(prompts), slots):
        part = prompts[s:s + slots]
        width = bucket_width(max(len(r) for r in part))
        ids, mask = pad_prompts(part, pad_id_of(cfg), width)
        res = generate(model, ids, attention_mask=mask, row_seeds=np.arange(s, s + len(part)), pad_aware=True, **kw)
        gen = np.asarray(res.generated)
        tokens += [np.concatenate([r, gen[i]]) for i, r in enumerate(part)]
        nfe += list(np.asarray(res.nfe))
        iterations += int(res.iterations)
    return tokens, np.asarray(nfe), iterations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu", help="cpu (the decoding issue's CPU config) | tiny | llada-8b")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--slots", default="8,32")
    ap.add_argument("--cache", default="none,dual", help="cache modes to run (none | prefix | dual), comma-separated")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating timed rounds (both runs once per round); wall times and their ratio are medians")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    on_gpu = jax.default_backend() == "gpu"
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    cfg = model_config(args.model)
    model = random_model(cfg, dtype)
    rng = np.random.default_rng(0)
    special = [cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id]
    prompts = []
    for n in rng.integers(args.min_len, args.max_len + 1, size=args.prompts):
        r = rng.integers(0, min(cfg.vocab_size, 32000), size=n)
        prompts.append(np.where(np.isin(r, special), 1, r).astype(np.int32))
    base = dict(gen_length=args.gen_len, block_length=args.block, strategy="planner", reveal="bernoulli",
                temperature=args.temperature, rng=0)
    rows = []
    for cache, slots in [(c, int(s)) for c in args.cache.split(",") for s in args.slots.split(",")]:
        kw = dict(base, cache=cache)
        runs = {"generate_many": lambda s=slots, kw=kw: generate_many(model, prompts, slots=s, **kw),
                "batched_generate": lambda s=slots, kw=kw: batched(model, prompts, s, kw)}
        out = {name: run() for name, run in runs.items()}  # compile every bucket's loop
        walls = {name: [] for name in runs}
        for _ in range(args.rounds):  # alternate, so a drift of the machine's speed hits both alike
            for name, run in runs.items():
                t0 = time.perf_counter()
                out[name] = run()
                walls[name].append(time.perf_counter() - t0)
        wall_m, many = float(np.median(walls["generate_many"])), out["generate_many"]
        wall_b, (tok_b, nfe_b, it_b) = float(np.median(walls["batched_generate"])), out["batched_generate"]
        ratio = float(np.median(np.asarray(walls["batched_generate"]) / np.asarray(walls["generate_many"])))
        same = all(np.array_equal(a, b) for a, b in zip(many.tokens, tok_b, strict=True))
        timing = many.timing
        rows.append({
            "cache": cache, "slots": slots, "generate_many_iterations": many.iterations, "batched_iterations": it_b,
            "iterations_ratio": round(it_b / many.iterations, 3), "generate_many_wall_s": round(wall_m, 3),
            "batched_wall_s": round(wall_b, 3), "wall_ratio": round(ratio, 3),
            "wall_s_rounds": {k: [round(w, 3) for w in v] for k, v in walls.items()},
            "mean_nfe": float(np.mean(many.nfe)), "max_nfe": int(np.max(many.nfe)),
            "same_tokens_and_nfe": bool(same and np.array_equal(many.nfe, nfe_b)),
            "segments": timing["segments"], "segment_ms": round(1e3 * timing["segment_s"] / timing["segments"], 2),
            "host_ms_per_segment": round(1e3 * timing["host_s"] / timing["segments"], 3),
            "host_fraction": round(timing["host_s"] / timing["segment_s"], 4),
        })
    result = {
        "benchmark": "continuous_batching", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "dtype": jnp.dtype(dtype).name, "prompts": args.prompts,
        "prompt_lengths": [args.min_len, args.max_len], "gen_len": args.gen_len, "block": args.block,
        "strategy": "planner (bernoulli)", "rounds": args.rounds, "rows": rows,
        "note": ("random weights: the NFE spread across rows is a random planner's. Iterations are loop forwards "
                 "of the batch; host_fraction is the engine's host time between compiled segments over its time "
                 "in them; "
                 + (f"wall times are medians of {args.rounds} alternating warm rounds (the ratio: the median of "
                    "the ratios within a round) on " if args.rounds > 1 else "wall time is one warm run of each on ")
                 + ("a GPU" if on_gpu else "a CPU machine shared with other jobs (its speed drifts)")),
    }
    print(f"{result['device']}  {args.model} {result['dtype']}  {args.prompts} prompts of {args.min_len}-"
          f"{args.max_len} tokens, G={args.gen_len} block={args.block}, planner (Bernoulli)")
    print(f"{'cache':>6} {'slots':>5} {'many iters':>10} {'batched':>8} {'ratio':>6} {'many s':>7} {'batched s':>9} "
          f"{'ratio':>6} {'same':>5} {'host/seg':>8}")
    for r in rows:
        print(f"{r['cache']:>6} {r['slots']:5d} {r['generate_many_iterations']:10d} {r['batched_iterations']:8d} "
              f"{r['iterations_ratio']:5.2f}x {r['generate_many_wall_s']:7.2f} {r['batched_wall_s']:9.2f} "
              f"{r['wall_ratio']:5.2f}x {r['same_tokens_and_nfe']!s:>5} {100 * r['host_fraction']:7.2f}%")
    name = "continuous_batching" if args.cache == "none" else "engine_continuous_cache"  # docs/engine.md's table
    out = Path(args.out) if args.out else RESULTS / f"{name}_{args.model}_{jax.default_backend()}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
