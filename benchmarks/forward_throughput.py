"""Forward-pass speed against the device's FLOP roofline.

    python benchmarks/forward_throughput.py --model llada-8b --batch 1 --seq-len 512        # on a GPU
    python benchmarks/forward_throughput.py --model tiny --batch 2 --seq-len 128            # anywhere

Random weights of the given shape (no download), created on the device. Reports ms per backbone forward and
per backbone + planner forward for each attention implementation, the measured dense-matmul rate of the
device in the compute dtype, and the roofline time 2 * (matmul params) * tokens / rate (attention score FLOPs
reported separately). Prints a table and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import RESULTS, commit, device_name, matmul_params, matmul_rate, random_model, write_json
from _common import median_ms as timeit
from flax import nnx

import dultra_jax
from dultra_jax.config import preset
from dultra_jax.model import DUltra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset: llada-8b | tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--impls", default="auto,xla", help="attention implementations to time (xla, cudnn, auto)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--matmul-n", type=int, default=0, help="matmul size for the rate (default 8192 GPU, 1024 CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/forward_<model>_<device>.json)")
    args = ap.parse_args()

    cfg = preset(args.model)
    dtype = dultra_jax.checkpoints.hf.parse_dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    n = args.matmul_n or (8192 if on_gpu else 1024)
    rate = matmul_rate(dtype, n)

    t0 = time.perf_counter()
    model = random_model(cfg, dtype)
    _, state = nnx.split(model)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    counts = matmul_params(model)
    n_total, n_planner = counts["total"], counts["planner"]
    n_backbone_matmul = counts["backbone_matmul"]  # blocks + LM head: what the forward multiplies by
    tokens = args.batch * args.seq_len
    attn_flops = 4 * args.batch * args.seq_len**2 * cfg.d_model * cfg.n_layers
    roof_ms = 2 * n_backbone_matmul * tokens / rate * 1e3
    roof_attn_ms = (2 * n_backbone_matmul * tokens + attn_flops) / rate * 1e3

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq_len)), jnp.int32)
    rows = []
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda impl=impl: DUltra(cfg, dtype=dtype, attention_impl=impl)))
        try:
            fwd_ms = timeit(dultra_jax.forward, graphdef, state, ids, iters=args.iters)

            @jax.jit
            def full(state, ids, graphdef=graphdef):
                logits, hidden = dultra_jax.forward(graphdef, state, ids)
                mask_index = ids == cfg.mask_token_id
                t = 1.0 - mask_index.mean(axis=1)
                return logits, dultra_jax.planner_forward(graphdef, state, hidden, t, mask_index)

            full_ms = timeit(full, state, ids, iters=args.iters)
        except Exception as e:  # an implementation the device lacks (e.g. cudnn on CPU)
            rows.append({"attention_impl": impl, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({
            "attention_impl": impl,
            "forward_ms": round(fwd_ms, 3),
            "forward_plus_planner_ms": round(full_ms, 3),
            "roofline_ms": round(roof_ms, 3),
            "roofline_with_attention_ms": round(roof_attn_ms, 3),
            "fraction_of_roofline": round(roof_ms / fwd_ms, 3),
            "tokens_per_s": round(tokens / (fwd_ms / 1e3), 1),
        })

    result = {
        "benchmark": "forward_throughput", "device": device_name(), "jax": jax.__version__, "commit": commit(),
        "model": args.model, "dtype": jnp.dtype(dtype).name, "batch": args.batch, "seq_len": args.seq_len,
        "params_total": n_total, "params_planner": n_planner, "params_backbone_matmul": n_backbone_matmul,
        "matmul_n": n, "matmul_tflops": round(rate / 1e12, 2), "init_s": round(init_s, 2), "rows": rows,
    }
    print(f"device {result['device']}  model {args.model} {result['dtype']}  B={args.batch} L={args.seq_len}  "
          f"params {n_total / 1e9:.3f}B  matmul {rate / 1e12:.1f} TFLOP/s")
    print(f"{'attention':>10} {'fwd ms':>9} {'fwd+plan ms':>12} {'roofline ms':>12} {'of roofline':>12} {'tok/s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['attention_impl']:>10}  error: {r['error']}")
        else:
            print(f"{r['attention_impl']:>10} {r['forward_ms']:9.2f} {r['forward_plus_planner_ms']:12.2f} "
                  f"{r['roofline_ms']:12.2f} {r['fraction_of_roofline']:12.1%} {r['tokens_per_s']:10.0f}")
    out = Path(args.out) if args.out else RESULTS / f"forward_{args.model}_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
