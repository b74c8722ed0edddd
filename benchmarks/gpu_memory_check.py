"""Planned vs measured memory on one real GPU: runs the memory plan's small case for real.

    PYTHONPATH=. python3 benchmarks/gpu_memory_check.py --out DIR        # on a machine with one GPU
    PYTHONPATH=. python3 benchmarks/gpu_memory_check.py --out DIR --model small   # seconds, anywhere (CPU: no peak)

For each case (the GRPO train micro-step and the rollout decode iteration of ``benchmarks/memory_plan.py``,
default model ``gpu-small``: LLaDA-8B widths and vocabulary with 2 layers, so it fits one H100) a fresh process
(the peak counter is per process):
1. compiles the program for one CPU device exactly as the memory plan does -> the plan's estimate;
2. compiles it for the GPU -> XLA:GPU's own estimate (same fields);
3. creates random weights / optimizer state / batch on the GPU, runs the step twice and reads
   ``device.memory_stats()['peak_bytes_in_use']``.
Writes ``DIR/gpu_memory_check.json`` and prints a table. Needs only jax, flax, optax and numpy: if the
``dultra_jax`` package's own ``__init__`` cannot be imported (its checkpoint I/O needs orbax/safetensors/tqdm),
the model modules are imported without it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# Per model: (train micro-batch, rollout batch, prompt length, generation length). gpu-small's plan is about
# 42 GiB (train) and 37 GiB (decode) on one device: measurable, and within an H100 with room for plan error.
CASES = {
    "gpu-small": {"train": 16, "decode": 32, "prompt_len": 256, "gen_len": 256},
    "small": {"train": 4, "decode": 4, "prompt_len": 32, "gen_len": 32},
}


def import_package() -> str:
    """Import dultra_jax; without its optional I/O dependencies, register the package bare (no ``__init__``)."""
    try:
        importlib.import_module("dultra_jax")
        return "full"
    except ImportError as e:
        for name in [m for m in sys.modules if m == "dultra_jax" or m.startswith("dultra_jax.")]:
            del sys.modules[name]
        pkg = types.ModuleType("dultra_jax")
        pkg.__path__ = [str(REPO / "dultra_jax")]
        sys.modules["dultra_jax"] = pkg
        return f"bare (package __init__ skipped: {e})"


# ------------------------------------------------------------------------------------------------ one case
def run_case(step: str, model: str, batch: int, prompt_len: int, gen_len: int, remat: str) -> dict:
    package = import_package()
    sys.path.insert(0, str(Path(__file__).parent))
    import flax
    import jax
    import jax.numpy as jnp
    import memory_plan as mp  # beside this file
    import numpy as np

    from dultra_jax.parallel import ShardingPlan, make_mesh, shardings_of

    device = jax.devices()[0]
    cfg = mp.MODELS[model]()
    fields = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "per_device_bytes")

    # XLA's estimate for this device (compiled first: on a CPU it is also the plan)
    plan = ShardingPlan(make_mesh("data=1,fsdp=1,tensor=1", devices=[device]))
    if step == "train":
        prog = mp.train_program(plan, cfg, batch, prompt_len, gen_len, remat=remat)
    else:
        prog = mp.decode_program(plan, cfg, batch, prompt_len, gen_len)
    t0 = time.perf_counter()
    compiled = prog.fn.lower(*prog.args).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    est = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}
    est["per_device_bytes"] = est["argument_bytes"] + est["output_bytes"] - est["alias_bytes"] + est["temp_bytes"]

    # the plan, as memory_plan.py computes it (XLA:CPU, one device); on a CPU that is the program just compiled
    if device.platform == "cpu":
        planned = {**est, "param_count": prog.param_count}
    else:
        planned = mp.plan_memory(model, "data=1,fsdp=1,tensor=1", step, batch, prompt_len, gen_len,
                                 devices=jax.devices("cpu")[:1], remat=remat)

    # for real: random weights created on the device, then the step
    rng = np.random.default_rng(0)
    length = prompt_len + gen_len
    canvas = rng.integers(0, cfg.vocab_size - 2, size=(batch, length)).astype(np.int32)
    canvas[:, prompt_len:] = cfg.mask_token_id
    block_end = np.full((batch,), prompt_len + 32, np.int32)
    if step == "train":
        model_obj = plan.create_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat,
                                      attention_impl="xla")
        params = flax.nnx.state(model_obj)
        tx = mp.make_optimizer()
        opt_state = jax.jit(tx.init, out_shardings=shardings_of(prog.args[1]))(params)
        revealed = rng.random((batch, length)) < 0.1
        data = {"canvas": canvas, "tokens": rng.integers(0, cfg.vocab_size - 2, size=(batch, length)),
                "reveal": revealed, "block_end": block_end, "old_logp": np.zeros(batch, np.float32),
                "advantages": rng.normal(size=batch).astype(np.float32)}
        data = jax.device_put({k: np.asarray(v, prog.args[2][k].dtype) for k, v in data.items()},
                              shardings_of(prog.args[2]))
        del model_obj

        def go(args):
            p, o, loss = compiled(*args, data)
            return (p, o), float(loss)

        args = (params, opt_state)
    else:
        model_obj = plan.create_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="xla")
        params = flax.nnx.state(model_obj)
        del model_obj
        steps = gen_len
        state = {"canvas": canvas, "block_end": block_end, "x0": np.zeros((steps, batch, length), np.int32),
                 "logp": np.zeros((steps, batch, length), np.float32), "step": np.int32(0),
                 "key": np.asarray(jax.random.key_data(jax.random.key(0)), np.uint32)}
        state = jax.device_put(state, shardings_of(prog.args[1]))

        def go(args):
            p, st = args
            st = compiled(p, st)
            return (p, st), int(st["step"])

        args = (params, state)
    jax.block_until_ready(args)
    stats = device.memory_stats() or {}
    before = stats.get("bytes_in_use")
    times, checks = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        args, check = go(args)
        jax.block_until_ready(args)
        times.append(time.perf_counter() - t0)
        checks.append(check)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "case": step,
        "model": model,
        "batch": batch,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "remat": remat if step == "train" else None,
        "param_count": planned["param_count"],
        "device": f"{device.platform}:{getattr(device, 'device_kind', '?')}",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "package_import": package,
        "plan_cpu": {k: planned[k] for k in fields},
        "xla_estimate_this_device": est,
        "compile_s": round(compile_s, 2),
        "measured": {
            "bytes_in_use_before_step": before,
            "peak_bytes_in_use": peak,
            "bytes_limit": stats.get("bytes_limit"),
            "note": None if peak is not None else f"{device.platform} reports no memory_stats(); run on a GPU",
        },
        "peak_over_plan": None if peak is None else round(peak / planned["per_device_bytes"], 3),
        "peak_over_xla_estimate": None if peak is None else round(peak / est["per_device_bytes"], 3),
        "step_s": [round(t, 4) for t in times],
        "check": checks,  # train: the loss of each step; decode: the step counter
    }


# ------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_memory_check.json")
    ap.add_argument("--model", default="gpu-small", choices=sorted(CASES))
    ap.add_argument("--cases", default="train,decode")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--decode-batch", type=int, default=None)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args(argv)
    sizes = dict(CASES[args.model])
    sizes["train"] = args.train_batch or sizes["train"]
    sizes["decode"] = args.decode_batch or sizes["decode"]

    if args.case:
        r = run_case(args.case, args.model, sizes[args.case], sizes["prompt_len"], sizes["gen_len"], args.remat)
        print("RESULT " + json.dumps(r))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    results, failed = [], False
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--out", str(out), "--model", args.model, "--case", case,
               "--train-batch", str(sizes["train"]), "--decode-batch", str(sizes["decode"]), "--remat", args.remat]
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
        print(f"{case:6s} {r['model']} B={r['batch']} on {r['device']}: plan {planned / GIB:.2f} GiB, "
              f"XLA estimate {est / GIB:.2f} GiB, measured peak "
              + (f"{peak / GIB:.2f} GiB (x{r['peak_over_plan']} of plan)" if peak is not None else "n/a"))
    doc = {"benchmark": "gpu_memory_check", "results": results}
    (out / "gpu_memory_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / 'gpu_memory_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
