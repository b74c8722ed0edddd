"""Does a configuration fit? Per-device memory of dUltra's two big programs, compiled ahead of time on fake devices.

    python benchmarks/memory_plan.py --model llada-8b --mesh data=1,fsdp=8,tensor=1 --step train \\
        --batch 64 --prompt-len 256 --gen-len 256 --json
    python benchmarks/memory_plan.py --model llada-8b --mesh data=1,fsdp=8,tensor=1 --search \\
        --out benchmarks/results/memory_plan.json          # largest batches that fit 8xH200 / 8xH100

Nothing is allocated: the model exists only as abstract shapes with their shardings (``ShardingPlan``), and
each program is lowered and compiled for N fake CPU devices (``jax_num_cpu_devices``); XLA's
``memory_analysis()`` then gives the per-device argument, output, alias and temporary bytes.

Programs (the shapes that matter for memory, written the way the real ones are):
- ``decode``: one rollout iteration over the canvas [B, P+G]: backbone forward, planner head, token proposal
  (Gumbel-max at the sampling temperature, log q at T=1 over the vocabulary minus MASK), Bernoulli reveals with
  the forced reveal, and the trajectory buffers [S, B, P+G] (S = G steps) updated in place. bf16 weights.
- ``train``: one GRPO micro-step: replay a recorded step on B rows with gradients (bf16 compute, fp32 master
  weights, remat of every scanned block), per-position log-probabilities of the planner (log p / log(1-p)) and
  of the tokens (log q), the sequence-level clipped ratio objective against the rollout's log-probability, then
  global-norm clipping and AdamW (fp32 moments), parameters and optimizer state donated.

Per-device bytes = arguments + outputs - aliased (donated) + temporaries. Arguments and outputs are exact; the
temporaries come from XLA:CPU's buffer assignment (GPU fusion differs; benchmarks/gpu_memory_check.py measures
the real peak on a GPU). "Fits" means within the budget minus the margin (default 10%).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dultra_jax.config import ModelConfig, preset
from dultra_jax.model import axes
from dultra_jax.parallel import MeshConfig, ShardingPlan, make_mesh, shardings_of

RESULTS = Path(__file__).parent / "results"
GB = 1e9
GIB = 1024**3
BUDGETS = {"h200": 141 * GB, "h100": 80 * GB}  # HBM per GPU as sold (141 GB, 80 GB)
DEFAULT_MARGIN = 0.10

# Model sizes the plan knows. "small" is the CI case (every dimension divisible by 8); "gpu-small" has the
# 8B model's widths (vocabulary, d_model, MLP, heads, planner) with 2 layers: big enough that activations and
# the vocabulary-sized tensors dominate as they do at 8B, small enough to run for real on one GPU.
MODELS: dict[str, Callable[[], ModelConfig]] = {
    "llada-8b": lambda: preset("llada-8b"),
    "gpu-small": lambda: preset("llada-8b", n_layers=2),
    "small": lambda: preset(
        "tiny", d_model=256, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=512, vocab_size=1024,
        embedding_size=1024, mask_token_id=1023, eos_token_id=1022, pad_token_id=1022, max_sequence_length=4096,
    ),
}

BATCH = axes.ACT_BATCH


# ------------------------------------------------------------------------------------------- programs
@dataclass
class Program:
    """A jitted step and the abstract arguments to lower it with."""

    fn: Any  # parallel.MeshJit
    args: tuple
    param_count: int
    param_bytes: int  # per device
    optimizer_bytes: int  # per device


def _abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def shard_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (by each leaf's sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _token_scores(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """float32 logits with MASK (and padding rows beyond the vocabulary) removed, as the sampler sees them."""
    vocab = jnp.arange(logits.shape[-1])
    ok = (vocab != cfg.mask_token_id) & (vocab < cfg.vocab_size)
    return jnp.where(ok, logits.astype(jnp.float32), -jnp.inf)


def _gather(scores: jax.Array, ids: jax.Array) -> jax.Array:
    """log-softmax(scores)[ids] without materialising the log-softmax."""
    picked = jnp.take_along_axis(scores, ids[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(scores, axis=-1)


def _planner_inputs(cfg: ModelConfig, canvas: jax.Array, block_end: jax.Array):
    is_mask = canvas == cfg.mask_token_id
    pos = jnp.arange(canvas.shape[1])
    mask_index = is_mask & (pos[None, :] < block_end[:, None])
    timestep = 1.0 - is_mask.mean(axis=1)
    return mask_index, timestep


def decode_program(plan: ShardingPlan, cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, *,
                   attention_impl: str = "xla", temperature: float = 0.1, max_steps: int | None = None) -> Program:
    """One rollout iteration (forward + planner + proposal + reveal), trajectory state donated."""
    graphdef, params = plan.abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                           attention_impl=attention_impl, on_uneven="raise")
    length, steps = prompt_len + gen_len, max_steps or gen_len
    rows, hist, vec = plan.batch_sharding(2), plan.sharding([None, BATCH, None]), plan.batch_sharding(1)
    rep = plan.replicated
    state = {
        "canvas": _abstract((batch, length), jnp.int32, rows),
        "block_end": _abstract((batch,), jnp.int32, vec),
        "x0": _abstract((steps, batch, length), jnp.int32, hist),
        "logp": _abstract((steps, batch, length), jnp.float32, hist),
        "step": _abstract((), jnp.int32, rep),
        "key": _abstract((2,), jnp.uint32, rep),
    }

    def iteration(params, st):
        model = nnx.merge(graphdef, params)
        canvas = st["canvas"]
        logits, hidden = model(canvas)
        scores = _token_scores(cfg, logits)
        key, k_tok, k_rev = jax.random.split(st["key"], 3)
        x0 = jax.random.categorical(k_tok, scores / temperature, axis=-1).astype(jnp.int32)  # Gumbel-max
        logq = _gather(scores, x0)  # temperature 1, as the original scores it
        mask_index, timestep = _planner_inputs(cfg, canvas, st["block_end"])
        p = jax.nn.sigmoid(model.planner_logits(hidden, timestep, mask_index)) * mask_index
        reveal = (jax.random.uniform(k_rev, p.shape) < p) & mask_index
        stuck = ~reveal.any(axis=1) & mask_index.any(axis=1)
        forced = jax.nn.one_hot(jnp.argmax(jnp.where(mask_index, p, -1.0), axis=1), p.shape[1], dtype=bool)
        reveal = reveal | (stuck[:, None] & forced)
        logp = jnp.where(reveal, jnp.log(jnp.maximum(p, 1e-30)) + logq, jnp.where(mask_index, jnp.log1p(-p), 0.0))
        s = st["step"]
        return {
            "canvas": jnp.where(reveal, x0, canvas),
            "block_end": st["block_end"],
            "x0": jax.lax.dynamic_update_index_in_dim(st["x0"], x0, s, 0),
            "logp": jax.lax.dynamic_update_index_in_dim(st["logp"], logp, s, 0),
            "step": s + 1,
            "key": key,
        }

    p_sh, s_sh = shardings_of(params), shardings_of(state)
    fn = plan.jit(iteration, in_shardings=(p_sh, s_sh), out_shardings=s_sh, donate_argnums=(1,))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    return Program(fn, (params, state), n, shard_bytes(params), 0)


def make_optimizer(lr: float = 5e-6) -> optax.GradientTransformation:
    """The original's GRPO optimiser (train.yaml): AdamW b 0.9/0.99, weight decay 0.1, grad-norm clip 1."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=0.1))


def grpo_loss(graphdef, cfg: ModelConfig, prompt_len: int, params, batch, *, eps_low: float = 0.2,
              eps_high: float = 1.0, adv_min_clip: float = 0.1) -> jax.Array:
    """Replay one decoding step with gradients: the original's clipped sequence-level ratio objective.

    ell[b, i] = log p_i + log q_i(token_i) where revealed, log(1 - p_i) where kept masked in the block;
    lambda_b = sum over the completion of ell - the rollout's value; loss = -min(rho A, clip(rho) A) / (B G).
    """
    model = nnx.merge(graphdef, params)
    canvas = batch["canvas"]
    logits, hidden = model(canvas)
    logq = _gather(_token_scores(cfg, logits), batch["tokens"])
    mask_index, timestep = _planner_inputs(cfg, canvas, batch["block_end"])
    z = model.planner_logits(hidden, timestep, mask_index)
    revealed = batch["reveal"] & mask_index
    ell = jnp.where(revealed, jax.nn.log_sigmoid(z) + logq, jnp.where(mask_index, jax.nn.log_sigmoid(-z), 0.0))
    lam = ell[:, prompt_len:].sum(axis=1) - batch["old_logp"]
    ratio = jnp.exp(lam)
    adv = jnp.where(batch["advantages"] < adv_min_clip, 0.0, batch["advantages"])
    per_row = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    return -per_row.sum() / (canvas.shape[0] * (canvas.shape[1] - prompt_len))


def train_program(plan: ShardingPlan, cfg: ModelConfig, batch: int, prompt_len: int, gen_len: int, *,
                  remat: str = "full", attention_impl: str = "xla") -> Program:
    """One GRPO micro-step + AdamW update; fp32 master weights and moments donated."""
    graphdef, params = plan.abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat,
                                           attention_impl=attention_impl, on_uneven="raise")
    tx = make_optimizer()
    p_sh = shardings_of(params)
    opt_abs = jax.eval_shape(tx.init, params)
    o_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abs, p_sh, transform_non_params=lambda _: plan.replicated,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt_state = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), opt_abs, o_sh)
    length = prompt_len + gen_len
    rows, vec = plan.batch_sharding(2), plan.batch_sharding(1)
    data = {
        "canvas": _abstract((batch, length), jnp.int32, rows),
        "tokens": _abstract((batch, length), jnp.int32, rows),
        "reveal": _abstract((batch, length), jnp.bool_, rows),
        "block_end": _abstract((batch,), jnp.int32, vec),
        "old_logp": _abstract((batch,), jnp.float32, vec),
        "advantages": _abstract((batch,), jnp.float32, vec),
    }

    def step(params, opt_state, data):
        loss, grads = jax.value_and_grad(lambda p: grpo_loss(graphdef, cfg, prompt_len, p, data))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fn = plan.jit(step, in_shardings=(p_sh, o_sh, shardings_of(data)), out_shardings=(p_sh, o_sh, plan.replicated),
                  donate_argnums=(0, 1))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    return Program(fn, (params, opt_state, data), n, shard_bytes(params), shard_bytes(opt_state))


# ------------------------------------------------------------------------------------------- analysis
def plan_memory(model: str | ModelConfig, mesh: str | MeshConfig, step: str, batch: int, prompt_len: int,
                gen_len: int, *, devices=None, margin: float = DEFAULT_MARGIN, remat: str = "full",
                attention_impl: str = "xla") -> dict[str, Any]:
    """Compile ``step`` for ``batch`` rows on ``mesh`` (fake CPU devices by default) and report per-device bytes."""
    cfg = MODELS[model]() if isinstance(model, str) else model
    devices = list(jax.devices("cpu") if devices is None else devices)
    mesh_obj = make_mesh(mesh, devices=devices)
    plan = ShardingPlan(mesh_obj)
    if batch <= 0 or batch % plan.batch_shards:
        raise ValueError(f"batch {batch} must be a positive multiple of {plan.batch_shards} "
                         f"(the batch is split over data x fsdp on mesh {mesh})")
    if step == "decode":
        prog = decode_program(plan, cfg, batch, prompt_len, gen_len, attention_impl=attention_impl)
    elif step == "train":
        prog = train_program(plan, cfg, batch, prompt_len, gen_len, remat=remat, attention_impl=attention_impl)
    else:
        raise ValueError(f"unknown step {step!r}; choose train or decode")
    t0 = time.perf_counter()
    lowered = prog.fn.lower(*prog.args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    arg, out, alias = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp, code = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    total = arg + out - alias + temp
    result = {
        "model": model if isinstance(model, str) else "custom",
        "mesh": ",".join(f"{k}={v}" for k, v in mesh_obj.shape.items()),
        "devices": len(devices),
        "backend": devices[0].platform,
        "step": step,
        "batch": batch,
        "batch_per_device": batch // plan.batch_shards,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "remat": remat if step == "train" else None,
        "attention_impl": attention_impl,
        "param_count": prog.param_count,
        "param_bytes_per_device": prog.param_bytes,
        "optimizer_bytes_per_device": prog.optimizer_bytes,
        "expected_argument_bytes": shard_bytes(prog.args),
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "generated_code_bytes": code,
        "per_device_bytes": total,
        "per_device_gib": round(total / GIB, 3),
        "margin": margin,
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
    }
    for name, budget in BUDGETS.items():
        result[f"{name}_budget_bytes"] = int(budget)
        result[f"fits_{name}"] = bool(total <= (1 - margin) * budget)
    return result


def largest_batch(evaluate: Callable[[int], dict], quantum: int, budget: float, margin: float,
                  start: int | None = None, cap: int = 1 << 16) -> tuple[dict | None, dict | None]:
    """(largest fitting result, smallest non-fitting result) over batches that are multiples of ``quantum``.

    Doubles until the budget is exceeded, then bisects; memory grows monotonically with the batch.
    """
    limit = (1 - margin) * budget
    fits = lambda r: r["per_device_bytes"] <= limit  # noqa: E731
    lo, hi = None, None
    b = start or quantum
    while b <= cap:
        r = evaluate(b)
        if fits(r):
            lo = r
            b *= 2
        else:
            hi = r
            break
    if lo is None:
        return None, hi
    if hi is None:
        return lo, None
    a, z = lo["batch"] // quantum, hi["batch"] // quantum
    while z - a > 1:
        m = (a + z) // 2
        r = evaluate(m * quantum)
        if fits(r):
            a, lo = m, r
        else:
            z, hi = m, r
    return lo, hi


def search(model: str, mesh: str, prompt_len: int, gen_len: int, steps: list[str], *, margin: float,
           remat: str, log=print) -> dict[str, Any]:
    devices = jax.devices("cpu")
    plan = ShardingPlan(make_mesh(mesh, devices=devices))
    out: dict[str, Any] = {}
    for step in steps:
        cache: dict[int, dict] = {}

        def evaluate(b, step=step, cache=cache):
            if b not in cache:
                cache[b] = plan_memory(model, mesh, step, b, prompt_len, gen_len, devices=devices, margin=margin,
                                       remat=remat)
                r = cache[b]
                log(f"  {step:6s} B={b:5d}: {r['per_device_gib']:7.2f} GiB/device "
                    f"(args {r['argument_bytes'] / GIB:.2f}, temp {r['temp_bytes'] / GIB:.2f}; "
                    f"compile {r['compile_s']:.1f}s)")
            return cache[b]

        entry = {}
        start = None
        for gpu in sorted(BUDGETS, key=BUDGETS.get):  # smaller budget first; its answer seeds the larger one
            best, first_over = largest_batch(evaluate, plan.batch_shards, BUDGETS[gpu], margin, start=start)
            entry[gpu] = {
                "largest_batch": best and best["batch"],
                "per_device_bytes": best and best["per_device_bytes"],
                "per_device_gib": best and best["per_device_gib"],
                "usable_bytes": int((1 - margin) * BUDGETS[gpu]),
                "next_batch_over_budget": first_over and first_over["batch"],
                "next_batch_per_device_gib": first_over and first_over["per_device_gib"],
            }
            start = best["batch"] if best else None
        entry["evaluations"] = [cache[b] for b in sorted(cache)]
        out[step] = entry
    return out


def machine() -> dict[str, str]:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flax

    return {"cpu": cpu, "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "commit": commit}


def _print_table(r: dict) -> None:
    gib = lambda x: f"{x / GIB:9.2f} GiB"  # noqa: E731
    print(f"{r['model']} {r['step']} B={r['batch']} P={r['prompt_len']} G={r['gen_len']} on mesh {r['mesh']} "
          f"({r['devices']} {r['backend']} devices); {r['param_count']:,} parameters")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "per_device_bytes"):
        print(f"  {k:18s} {gib(r[k])}")
    for name in BUDGETS:
        usable = (1 - r["margin"]) * r[f"{name}_budget_bytes"]
        print(f"  {name.upper()} budget {r[f'{name}_budget_bytes'] / GB:.0f} GB, usable with {r['margin']:.0%} margin "
              f"{usable / GIB:.1f} GiB: {'fits' if r[f'fits_{name}'] else 'DOES NOT FIT'}")
    print(f"  lower {r['lower_s']} s, compile {r['compile_s']} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llada-8b", choices=sorted(MODELS))
    ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1", help="AXIS=SIZE,... over data, fsdp, tensor")
    ap.add_argument("--devices", type=int, default=None,
                    help="fake CPU devices (default: the mesh's product, or 8 if it has a -1)")
    ap.add_argument("--step", default="train", choices=["train", "decode", "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    ap.add_argument("--json", action="store_true", help="print one JSON object per step")
    ap.add_argument("--search", action="store_true",
                    help="find the largest batch that fits each budget and write --out")
    ap.add_argument("--out", default=str(RESULTS / "memory_plan.json"))
    args = ap.parse_args(argv)

    cfg = MeshConfig.parse(args.mesh)
    n = args.devices or (8 if -1 in cfg.sizes.values() else int(np.prod(list(cfg.sizes.values()))))
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    steps = ["train", "decode"] if args.step == "all" else [args.step]

    if args.search:
        t0 = time.perf_counter()
        log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        found = search(args.model, args.mesh, args.prompt_len, args.gen_len, steps, margin=args.margin,
                       remat=args.remat, log=log)
        doc = {
            "benchmark": "memory_plan",
            "model": args.model,
            "mesh": str(cfg),
            "devices": n,
            "prompt_len": args.prompt_len,
            "gen_len": args.gen_len,
            "margin": args.margin,
            "budgets_bytes": {k: int(v) for k, v in BUDGETS.items()},
            "machine": machine(),
            "search_s": round(time.perf_counter() - t0, 1),
            **found,
        }
        out = Path(args.out)
        if out.is_file():  # keep the other step's entry when searching one step at a time
            old = json.loads(out.read_text())
            if all(old.get(k) == doc[k] for k in ("model", "mesh", "prompt_len", "gen_len", "margin")):
                doc = {**old, **doc}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        summary = {s: {g: doc[s][g]["largest_batch"] for g in BUDGETS} for s in steps}
        print(json.dumps(summary) if args.json else f"largest batches: {summary}; wrote {out}")
        return 0

    for step in steps:
        r = plan_memory(args.model, args.mesh, step, args.batch, args.prompt_len, args.gen_len,
                        margin=args.margin, remat=args.remat)
        if args.json:
            print(json.dumps(r))
        else:
            _print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
