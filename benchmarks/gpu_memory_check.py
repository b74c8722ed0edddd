"""Planned vs measured memory on one real GPU: the memory plan's programs (the trainer's own train step and
rollout loop, benchmarks/memory_plan.py) run for real.

    python benchmarks/gpu_memory_check.py --out DIR                      # one GPU: 8B widths, 2 layers, S = 256
    python benchmarks/gpu_memory_check.py --out DIR --config configs/tiny_cpu.yaml --layers 0   # seconds, anywhere

By default it takes ``configs/grpo_gsm8k_b32.yaml`` at 2 of its layers (LLaDA-8B widths and vocabulary) on a
one-device mesh, with the rows one GPU of the 8-GPU run gets: the train step's micro-batch rows per device
(recorded steps = the rollout's cap, 256) and the rollout's rows per device. For each program (a fresh
process each: the peak counter is per process) it
1. compiles the program for one CPU device exactly as the memory plan does -> the plan's estimate;
2. compiles it for the GPU -> XLA:GPU's own estimate (same fields);
3. creates random weights, optimiser state and inputs on the GPU, runs the program twice and reads
   ``device.memory_stats()['peak_bytes_in_use']``.
Writes ``DIR/gpu_memory_check.json`` and prints a table. JAX preallocates 75% of the GPU by default; the
driver sets ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` for the children (the peak counter is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
DEFAULT_CONFIG = REPO / "configs" / "grpo_gsm8k_b32.yaml"
FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "per_device_bytes")


def _random_tree(tree, vocab: int, seed: int):
    """Random device arrays for an abstract tree (each leaf created in place with its sharding): floats small
    normals, ids in the ordinary vocabulary, padding masks all ones, reveal flags 5% True, keys fresh."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for i, (path, a) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        key = jax.random.fold_in(jax.random.key(seed), i)

        def make(a=a, key=key, name=name):
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.random.key(0)
            if a.dtype == jnp.bool_:
                return jax.random.bernoulli(key, 0.05, a.shape)
            if jnp.issubdtype(a.dtype, jnp.integer):
                if "mask" in name:
                    return jnp.ones(a.shape, a.dtype)
                return jax.random.randint(key, a.shape, 0, min(vocab - 3, 100_000), a.dtype)
            return (0.02 * jax.random.normal(key, a.shape, jnp.float32)).astype(a.dtype)

        out.append(jax.jit(make, out_shardings=a.sharding)())
    return jax.tree_util.tree_unflatten(treedef, out)


def _left_to_right(rollout, prompt_len: int):
    """A valid recorded trajectory for the replay: iteration s reveals generation position s (every iteration
    active: the replay's worst case), with the old log-probabilities at 0."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    shape, sharding = rollout.reveal.shape, rollout.reveal.sharding  # [n, S, rows, L]

    def make():
        s = jnp.arange(shape[1])[:, None, None]
        pos = jnp.arange(shape[3])[None, None, :]
        return jnp.broadcast_to((pos == prompt_len + s)[None], shape)

    reveal = jax.jit(make, out_shardings=sharding)()
    return dataclasses.replace(rollout, reveal=reveal, old_logps=rollout.old_logps * 0)


def run_case(case: str, config: str, layers: int | None, micro_rows: int | None, rollout_rows: int | None,
             overrides: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    import jax
    import memory_plan as mp  # beside this file

    from dultra_jax.training.config import load_run_config

    run = load_run_config(config, overrides)
    device = jax.devices()[0]
    one = "data=1,fsdp=1,tensor=1"

    def program(devices):
        setup = mp.make_setup(run, devices, mesh=one, layers=layers)
        if case == "train_step":
            return setup, mp.train_step_program(setup, micro_rows=micro_rows)
        return setup, mp.rollout_program(setup, rows=rollout_rows, weights=case.split(":", 1)[1])

    cpu_setup, cpu_prog = program(jax.devices("cpu")[:1])
    planned, compiled = mp.measure(cpu_prog, return_compiled=True)
    if device.platform == "cpu":  # XLA:CPU's estimate for this device is the plan
        setup, prog, est = cpu_setup, cpu_prog, dict(planned)
    else:
        setup, prog = program([device])
        est, compiled = mp.measure(prog, return_compiled=True)

    vocab = setup.model_cfg.vocab_size
    args = list(prog.args)
    present = [i for i, a in enumerate(args) if a is not None]
    made = _random_tree([args[i] for i in present], vocab, seed=0)
    for i, a in zip(present, made, strict=True):
        args[i] = a
    if case == "train_step" and setup.grpo:
        args[2] = jax.tree.map(lambda a: a * 0, args[2])  # fresh optimiser moments, as the trainer starts
        args[3] = _left_to_right(args[3], setup.prompt_len)
    jax.block_until_ready(args)
    stats = device.memory_stats() or {}
    before = stats.get("bytes_in_use")
    times, checks = [], []
    with setup.plan.context():
        for _ in range(2):
            t0 = time.perf_counter()
            if case == "train_step":
                trainable, opt_state, metrics = compiled(*args)
                jax.block_until_ready(trainable)
                args[0], args[2] = trainable, opt_state
                checks.append(float(metrics["loss"]))
            else:
                res = compiled(*args)
                jax.block_until_ready(res.tokens)
                checks.append(int(res.iterations))
            times.append(time.perf_counter() - t0)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    info = {k: v for k, v in planned.items() if k not in FIELDS}
    return {
        "case": case, "config": str(config), "model": setup.model_source,
        "batch": info.get("micro_batch_rows", info.get("rows")), "info": info,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '?')}", "jax": jax.__version__,
        "plan_cpu": {k: planned[k] for k in FIELDS}, "xla_estimate_this_device": {k: est[k] for k in FIELDS},
        "measured": {"bytes_in_use_before_step": before, "peak_bytes_in_use": peak,
                     "bytes_limit": stats.get("bytes_limit"),
                     "note": None if peak is not None else f"{device.platform} has no memory_stats(); run on a GPU"},
        "peak_over_plan": None if peak is None else round(peak / planned["per_device_bytes"], 3),
        "peak_over_xla_estimate": None if peak is None else round(peak / est["per_device_bytes"], 3),
        "step_s": [round(t, 4) for t in times],
        "check": checks,  # train step: the loss of each step; rollout: the loop's iterations
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_memory_check.json")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--layers", type=int, default=2, help="layers to build (0: the config's own)")
    ap.add_argument("--micro-rows", type=int, default=None,
                    help="train micro-batch rows (default: one device's share of the config's)")
    ap.add_argument("--rollout-rows", type=int, default=None,
                    help="rollout rows (default: one device's share of the config's)")
    ap.add_argument("--cases", default="train_step,rollout:sharded,rollout:replicated_bf16")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    layers = args.layers or None

    if args.micro_rows is None or args.rollout_rows is None:  # one device's share of the config's mesh
        from dultra_jax.parallel import MeshConfig
        from dultra_jax.training.config import load_run_config

        run = load_run_config(args.config, args.set)
        n_dev = 1
        if run.train.mesh:
            sizes = MeshConfig.parse(run.train.mesh).sizes
            n_dev = max(1, sizes["data"]) * max(1, sizes["fsdp"]) if -1 not in sizes.values() else 8
        rows = run.train.batch_size * (run.grpo.num_generations if run.train.mode == "grpo" else 1)
        args.micro_rows = args.micro_rows or max(1, rows // run.train.micro_batches // n_dev)
        args.rollout_rows = args.rollout_rows or max(1, rows // n_dev)

    if args.case:
        r = run_case(args.case, args.config, layers, args.micro_rows, args.rollout_rows, args.set)
        print("RESULT " + json.dumps(r))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    results, failed = [], False
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--out", str(out), "--config", args.config, "--layers", str(args.layers),
               "--micro-rows", str(args.micro_rows), "--rollout-rows", str(args.rollout_rows), "--case", case]
        for item in args.set:
            cmd += ["--set", item]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            failed = True
            results.append({"case": case, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]})
            print(f"{case}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        peak = r["measured"]["peak_bytes_in_use"]
        planned, est = r["plan_cpu"]["per_device_bytes"], r["xla_estimate_this_device"]["per_device_bytes"]
        print(f"{case:26s} {r['batch']} rows on {r['device']}: plan {planned / GIB:.2f} GiB, XLA estimate "
              f"{est / GIB:.2f} GiB, measured peak "
              + (f"{peak / GIB:.2f} GiB (x{r['peak_over_plan']} of plan)" if peak is not None else "n/a"))
    doc = {"benchmark": "gpu_memory_check", "results": results}
    tmp = out / ".gpu_memory_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out / "gpu_memory_check.json")
    print(f"wrote {out / 'gpu_memory_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
