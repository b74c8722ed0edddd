"""What a cached decode iteration moves, from XLA's own cost analysis, against the bytes floor.

    python benchmarks/decode_bytes.py                       # LLaDA-8B widths, prefix + dual, B=1 and B=8
    python benchmarks/decode_bytes.py --label after --json

The programs are the decoding loop's own: ``loop._window_forward`` (a cached iteration: backbone and planner
head over the window, reading the cache) and ``loop._full_forward`` (the refresh: the exact forward that fills
the cache), each followed by ``DUltra.lm_logits`` on the block, exactly as the loop body calls them. They are
lowered with abstract inputs (``jax.ShapeDtypeStruct``: no weights anywhere) and compiled for the CPU; XLA's
``cost_analysis()`` gives ``bytes accessed`` and ``flops`` of the whole program. Compiling all 32 layers at 8B
widths is slow, so each program is compiled at two reduced layer counts and every figure is extrapolated
linearly per layer to the model's count (as ``memory_plan.py`` does).

The floor of a cached iteration is what it cannot avoid reading: every parameter it multiplies by (backbone
blocks, final norm, LM head, planner head; the embedding table only at the window's rows) plus the whole cache
(keys and values of every backbone and head layer over the canvas). A refresh reads the parameters and writes
the cache. ``ratio`` = bytes accessed / floor: copies the floor does not need (a cache rewritten per layer, a
weight slice materialised per layer) show up as a ratio well above 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import RESULTS, commit, loop_programs, model_config, write_json  # noqa: E402
from dultra_jax.decoding import loop as L  # noqa: E402
from dultra_jax.model import DUltra  # noqa: E402

GB = 1e9


def _nbytes(tree) -> int:
    return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


LAYER_LOOPS = ("unrolled", "stacked", "scan")


def abstract_model(cfg, dtype=jnp.float32, layer_loop: str = "unrolled"):
    """(graphdef, abstract state) of a DUltra of ``cfg`` in ``dtype`` as the decoding loop iterates it: shapes
    only. ``unrolled``: per-layer weight buffers (``DecodeConfig.layer_loop="unrolled"``); ``stacked``: an
    unrolled loop slicing the stacked weights (``scan_layers=False``); ``scan``: the layer scan (XLA's cost
    analysis counts a loop body once, so its bytes are not comparable)."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    model = nnx.eval_shape(lambda: DUltra(cfg, dtype=dtype, scan_layers=layer_loop == "scan", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    if layer_loop == "unrolled":
        graphdef, state = jax.eval_shape(L.unstacked_layers, graphdef, state)
    return graphdef, state


def programs(cfg, *, batch: int, prompt: int, gen: int, block_length: int, mode: str, block: int = 0,
             dtype=jnp.float32, layer_loop: str = "unrolled"):
    """{name: (jitted fn, abstract args, floor bytes)} of the cached iteration and the refresh of ``block``."""
    graphdef, state = abstract_model(cfg, dtype, layer_loop)
    refresh, cached, shape = loop_programs(graphdef, batch=batch, prompt=prompt, gen=gen,
                                           block_length=block_length, mode=mode, block=block)
    length, width = shape["canvas"], shape["window"]

    x = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mi = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cache = jax.eval_shape(refresh, state, x, mi, t)[2]
    s = jax.ShapeDtypeStruct((), jnp.int32)

    params = nnx.state(nnx.eval_shape(lambda: DUltra(cfg, dtype=dtype, rngs=nnx.Rngs(0))), nnx.Param)
    embed = cfg.embedding_size * cfg.d_model * np.dtype(dtype).itemsize
    # parameters every position's computation multiplies by, plus the embedding rows the program looks up
    row_bytes = cfg.d_model * np.dtype(dtype).itemsize
    param_read = _nbytes(params) - embed
    cache_bytes = _nbytes(cache)
    return {
        "cached": (cached, (state, x, mi, t, cache, s),
                   {"params": param_read + batch * width * row_bytes, "cache": cache_bytes}),
        "refresh": (refresh, (state, x, mi, t),
                    {"params": param_read + batch * length * row_bytes, "cache": cache_bytes}),
    }, shape


def measure(fn, args) -> dict:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bytes_accessed": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0)),
            "compile_s": round(time.perf_counter() - t0, 2)}


def run(model: str, *, batches, modes, prompt: int, gen: int, block_length: int, layers: tuple[int, int],
        block: int = 0, layer_loop: str = "unrolled") -> list[dict]:
    base = model_config(model) if isinstance(model, str) else model  # a preset name or a ModelConfig
    target = base.n_layers
    rows = []
    for mode in modes:
        for b in batches:
            at = {}
            for n in layers:
                cfg = dataclasses.replace(base, n_layers=n)
                progs, shape = programs(cfg, batch=b, prompt=prompt, gen=gen, block_length=block_length, mode=mode,
                                        block=block, layer_loop=layer_loop)
                at[n] = {k: (measure(fn, args), floor) for k, (fn, args, floor) in progs.items()}
            (n1, a), (n2, c) = sorted(at.items())
            lin = lambda u, v, n1=n1, n2=n2: u + (v - u) * (target - n1) / (n2 - n1)  # noqa: E731
            for prog in ("cached", "refresh"):
                (m1, f1), (m2, f2) = a[prog], c[prog]
                floor = {k: lin(f1[k], f2[k]) for k in f1}
                floor_total = sum(floor.values())
                got = lin(m1["bytes_accessed"], m2["bytes_accessed"])
                rows.append({
                    "mode": mode, "batch": b, "program": prog, **shape,
                    "bytes_accessed": got, "flops": lin(m1["flops"], m2["flops"]),
                    "floor_bytes": floor_total, "floor_param_bytes": floor["params"],
                    "floor_cache_bytes": floor["cache"], "ratio": got / floor_total,
                    "per_layer_bytes": (m2["bytes_accessed"] - m1["bytes_accessed"]) / (n2 - n1),
                    "measured": {str(n1): m1, str(n2): m2},
                })
    return rows


def print_table(rows) -> None:
    print(f"{'mode':6} {'B':>3} {'program':8} {'window':>6} {'GB accessed':>12} {'GB floor':>9} {'ratio':>6} "
          f"{'TFLOP':>7}")
    for r in rows:
        print(f"{r['mode']:6} {r['batch']:>3} {r['program']:8} {r['window']:>6} {r['bytes_accessed'] / GB:>12.2f} "
              f"{r['floor_bytes'] / GB:>9.2f} {r['ratio']:>6.2f} {r['flops'] / 1e12:>7.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llada-8b", help="llada-8b (default), tiny or cpu: widths (no weights)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--modes", default="prefix,dual")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--block", type=int, default=0, help="which block's cached iteration (prefix: widest at 0)")
    ap.add_argument("--layers", default="2,4", help="two reduced layer counts to extrapolate from")
    ap.add_argument("--layer-loop", default="unrolled", choices=LAYER_LOOPS,
                    help="unrolled (per-layer weights, the default), stacked (scan_layers=False) or scan")
    ap.add_argument("--label", default="", help="tag for the JSON file name (e.g. before / after)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/decode_bytes_<model>[_label].json")
    a = ap.parse_args(argv)
    n1, n2 = (int(v) for v in a.layers.split(","))
    rows = run(a.model, batches=[int(v) for v in a.batch.split(",")], modes=a.modes.split(","), prompt=a.prompt,
               gen=a.gen, block_length=a.block_length, layers=(n1, n2), block=a.block,
               layer_loop=a.layer_loop)
    print_table(rows)
    if a.json:
        doc = {
            "benchmark": "decode_bytes", "model": a.model, "dtype": "float32", "commit": commit(),
            "layer_loop": a.layer_loop,
            "label": a.label, "prompt": a.prompt, "gen": a.gen, "block_length": a.block_length, "block": a.block,
            "method": (f"XLA:CPU cost_analysis of the loop's own cached iteration and refresh, compiled at "
                       f"{n1} and {n2} layers with abstract inputs, extrapolated linearly per layer"),
            "dtype_note": ("XLA:CPU upcasts bf16 dots to f32 (extra converts an accelerator does not do), so the "
                           "programs are analysed in float32: bf16 bytes are half, the ratios the same"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "jax": jax.__version__, "note": "compile-only: byte counts do not depend on machine load"},
            "rows": rows,
        }
        name = f"decode_bytes_{a.model}{'_' + a.label if a.label else ''}.json"
        write_json(RESULTS / name, doc)
        print(f"wrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
