"""How the replayed GRPO loss's gradient memory grows with the number of recorded iterations S.

    python benchmarks/replay_memory.py --steps 8 32 64 --label after

AOT-compiles ``jax.grad`` of the project's own :func:`dultra_jax.training.grpo.grpo_loss` (abstract inputs,
nothing allocated) for a ~20M-parameter model at several S and reports XLA's temporaries. The loss must hold
O(1) parameter copies whatever S is: the temporaries' growth per recorded iteration is compared with the
parameter bytes (a slope near the parameter bytes means one parameter copy per iteration is kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, commit, device_name, write_json  # noqa: E402

from dultra_jax.config import ModelConfig, preset  # noqa: E402
from dultra_jax.model import DUltra  # noqa: E402
from dultra_jax.training.grpo import GRPOLossConfig, Rollout, grpo_loss  # noqa: E402

# ~20M parameters (76-80 MB fp32): large enough that a parameter copy stands out against the activations.
MODEL = dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=1024, vocab_size=4096,
             embedding_size=4096, mask_token_id=4095, eos_token_id=4094, pad_token_id=4094, max_sequence_length=1024)


def replay_grad_memory(cfg: ModelConfig, steps: int, batch: int, prompt_len: int, gen_len: int, *,
                       block_length: int = 32, remat: str = "none") -> dict:
    """XLA memory analysis of jit(grad(grpo_loss)) for ``steps`` recorded iterations (fp32, one device)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DUltra(cfg, remat=remat)))
    length = prompt_len + gen_len
    sds = jax.ShapeDtypeStruct
    rollout = Rollout(
        prompt_ids=sds((batch, prompt_len), jnp.int32), reveal=sds((steps, batch, length), jnp.bool_),
        proposals=sds((steps, batch, length), jnp.int32), old_logps=sds((steps, batch, length), jnp.float32),
        advantages=sds((batch,), jnp.float32), attention_mask=sds((batch, length), jnp.int32),
    )
    loss_cfg = GRPOLossConfig(block_length=block_length, max_completion_length=gen_len)
    grad = jax.jit(jax.grad(lambda st, ro: grpo_loss(graphdef, (st,), ro, loss_cfg)[0]))
    t0 = time.perf_counter()
    mem = grad.lower(state, rollout).compile().memory_analysis()
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {"steps": steps, "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "param_bytes": param_bytes, "compile_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 32, 64], help="recorded iterations S")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"],
                    help="the model's per-block remat policy")
    ap.add_argument("--label", default="current", help="names the JSON (e.g. before / after a change)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")

    cfg = preset("tiny", **MODEL)
    rows = []
    for s in args.steps:
        r = replay_grad_memory(cfg, s, args.batch, args.prompt_len, args.gen_len, remat=args.remat)
        rows.append(r)
        print(f"S={s:4d}: temp {r['temp_bytes'] / 1e6:9.1f} MB  (params {r['param_bytes'] / 1e6:.1f} MB, "
              f"compile {r['compile_s']:.1f} s)", flush=True)
    s0, s1 = rows[0], rows[-1]
    slope = (s1["temp_bytes"] - s0["temp_bytes"]) / max(s1["steps"] - s0["steps"], 1)
    params = s0["param_bytes"]
    print(f"temporaries grow {slope / 1e6:.2f} MB per recorded iteration = {slope / params:.3f} parameter copies")
    doc = {
        "benchmark": "replay_memory", "label": args.label, "device": device_name(), "commit": commit(),
        "jax": jax.__version__, "model": MODEL, "param_count": params // 4, "param_bytes": params,
        "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "remat": args.remat,
        "rows": rows, "temp_bytes_per_step": slope, "param_copies_per_step": slope / params,
    }
    out = Path(args.out) if args.out else RESULTS / f"replay_memory_{args.label}.json"
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
