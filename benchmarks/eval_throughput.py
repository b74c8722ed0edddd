"""Throughput of ``dultra eval`` itself: problems/s and effective tokens/s, one device against a data-parallel mesh.

    python benchmarks/eval_throughput.py --model runs/toy/grpo/model          # the demo model (CPU, 1 and 4 devices)
    python benchmarks/eval_throughput.py                                       # no demo model: the tiny checkpoint
    PYTHONPATH=. python3 benchmarks/eval_throughput.py --gpu --slots 1,32      # GPU: random 8B-shaped weights

CPU part: each device count runs in a fresh process (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must
be set before jax starts) that calls the harness as ``dultra eval`` does (``run_eval``, ``--mesh data=N``), on
the synthetic addition task with the demo's decoding (planner, gen 16, block 8). Fake CPU devices share the
machine's cores, so this measures the sharded program's overhead and scaling on one CPU, not extra hardware.
The figures are the summary's own: decode wall time only (compilation excluded), problems = seeds x problems.

GPU part (``--gpu``): random weights of the LLaDA-8B shape (bf16) on the first GPU, random prompts, the planner
rule at gen 256 / block 32, the batch of ``--slots`` rows per decode call (the continuous-batching slots once
``decoding.generate_many`` lands; until then a batch of ``slots`` rows), through the harness's batched decode.

JSON in benchmarks/results/ with device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
KEEP = ("n_problems", "n_samples", "seeds", "accuracy", "accuracy_std", "accuracy_per_seed", "mean_nfe", "tpf",
        "decode_time_s", "positions_per_s", "effective_tokens_per_s", "compile_and_warmup_s", "batch_size", "mesh",
        "device", "jax", "commit")


def _child(args: argparse.Namespace) -> None:
    """One measurement in this process (its device count was fixed by XLA_FLAGS before jax started)."""
    from dultra_jax.eval import EvalSettings, run_eval

    settings = EvalSettings.create(strategy="planner", gen_length=args.gen_length, block_length=args.block_length,
                            batch_size=args.batch_size, pad_multiple=64)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        [s] = run_eval(args.model, "synthetic-addition", settings, seeds=args.seeds, limit=args.problems,
                       max_operand=args.max_operand, out_dir=tmp, dtype="fp32", progress=False,
                       mesh=f"data={args.devices}" if args.devices > 1 else None)
        wall = time.perf_counter() - t0
    row = {k: s.get(k) for k in KEEP}
    row.update(devices=args.devices, problems_per_s=s["n_samples"] / s["decode_time_s"], end_to_end_s=wall)
    print("RESULT " + json.dumps(row))


def _measure(args: argparse.Namespace, devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, __file__, "--child", "--devices", str(devices), "--model", args.model,
           "--problems", str(args.problems), "--batch-size", str(args.batch_size), "--gen-length",
           str(args.gen_length), "--block-length", str(args.block_length), "--max-operand", str(args.max_operand),
           "--seeds", *map(str, args.seeds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the {devices}-device run failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def _default_model() -> tuple[str, str]:
    """(path, what it is): the demo's GRPO model when a demo/toy run left one, else the tiny checkpoint."""
    for d in (REPO / "runs" / "toy" / "grpo" / "model", REPO / "runs" / "demo" / "grpo" / "model"):
        if (d / "dultra_jax.json").is_file():
            return str(d), _describe(str(d.relative_to(REPO)))
    return "", "tiny"


def _describe(model: str) -> str:
    """What a given checkpoint is: a demo stage's model (``.../<stage>/model`` of a demo or toy run) or other."""
    p = Path(model)
    if p.name == "model" and p.parent.name in ("sft", "planner", "grpo"):
        return f"demo model, {p.parent.name} stage ({model})"
    return f"checkpoint {model}"


def _tiny_checkpoint(tmp: Path) -> str:
    """The embedded lladou-tiny checkpoint (random weights, ids laid out like the char tokenizer) with the
    synthetic task's tokenizer beside it."""
    import shutil

    from dultra_jax.cli import embedded_checkpoint
    from dultra_jax.data import synthetic

    d = tmp / "tiny-char"
    shutil.copytree(embedded_checkpoint(), d)
    synthetic.save_tokenizer(d)
    return str(d)


def _cpu(args: argparse.Namespace) -> None:
    from dultra_jax.eval.env import cpu_model, git_commit

    what = _describe(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            args.model, what = _default_model()
            if not args.model:
                args.model, what = _tiny_checkpoint(Path(tmp)), "tiny random checkpoint (no demo model found)"
        rows = [_measure(args, n) for n in args.device_counts]
    base = rows[0]
    for r in rows:
        r["speedup_problems_per_s"] = r["problems_per_s"] / base["problems_per_s"]
    result = {"benchmark": "eval_throughput", "part": "cpu", "model": what, "model_path": args.model,
              "task": "synthetic-addition", "problems": args.problems, "max_operand": args.max_operand,
              "seeds": args.seeds, "strategy": "planner", "gen_length": args.gen_length,
              "block_length": args.block_length, "batch_size": args.batch_size,
              "machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores",
              "commit": git_commit(), "rows": rows,
              "note": "fake CPU devices share the same cores: the mesh splits rows, it adds no compute"}
    kind = "demo" if what.startswith("demo") else "tiny" if what.startswith("tiny") else Path(args.model).name
    name = f"eval_throughput_cpu_{kind}.json"
    _write(RESULTS / name, result)
    print(f"{'devices':>7} {'problems/s':>11} {'eff tok/s':>10} {'NFE':>6} {'TPF':>6} {'accuracy':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['devices']:>7} {r['problems_per_s']:11.1f} {r['effective_tokens_per_s']:10.1f} "
              f"{r['mean_nfe']:6.2f} {r['tpf']:6.2f} {r['accuracy']:9.1%} {r['speedup_problems_per_s']:8.2f}")
    print(f"model: {what}; wrote {RESULTS / name}")


def _gpu(args: argparse.Namespace) -> None:
    """Slots 1 vs N on one GPU with random 8B-shaped weights (written for the GPU machine; see the module doc)."""
    import jax
    import numpy as np
    from _common import model_config, random_model, random_prompts

    from dultra_jax.accounting import model_excluded_ids
    from dultra_jax.eval.env import device_name, git_commit
    from dultra_jax.eval.harness import EvalSettings, decode_prompts

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("--gpu needs a GPU (jax.devices() has none)")
    import jax.numpy as jnp

    cfg = model_config("llada-8b")
    model = random_model(cfg, jnp.bfloat16)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_min, args.prompt_max + 1, size=args.problems)
    prompts = [random_prompts(cfg, 1, int(n), seed=k)[0] for k, n in enumerate(lengths)]
    exclude = model_excluded_ids(cfg)
    rows = []
    for slots in args.slots:
        s = EvalSettings.create(strategy="planner", gen_length=256, block_length=32, batch_size=slots, pad_multiple=64)
        run = decode_prompts(model, prompts, s, seed=0, exclude=exclude)
        wall = sum(b["time_s"] for b in run.batches)
        eff = sum(b["effective_tokens"] for b in run.batches)
        rows.append({"slots": slots, "problems": len(prompts), "decode_time_s": wall,
                     "problems_per_s": len(prompts) / wall, "effective_tokens_per_s": eff / wall,
                     "compile_s": run.compile_s,
                     "mean_nfe": float(np.mean([x["nfe"] for x in run.samples]))})
        print(rows[-1])
    result = {"benchmark": "eval_throughput", "part": "gpu", "model": "llada-8b random weights (bf16)",
              "device": device_name(), "jax": jax.__version__, "commit": git_commit(),
              "prompt_lengths": [args.prompt_min, args.prompt_max], "gen_length": 256, "block_length": 32,
              "rows": rows}
    _write(RESULTS / "eval_throughput_gpu_llada-8b.json", result)




def _write(path: Path, obj: dict) -> None:
    sys.path.insert(0, str(HERE))
    import jax
    from _common import write_json

    obj.setdefault("jax", jax.__version__)
    obj.setdefault("python", platform.python_version())
    write_json(path, obj)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="converted checkpoint with the char tokenizer (default: the demo's)")
    ap.add_argument("--device-counts", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--max-operand", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=16)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--gpu", action="store_true", help="the GPU part: slots 1 vs N, random 8B-shaped weights")
    ap.add_argument("--slots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=192)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
    elif args.gpu:
        if args.problems == 256:
            args.problems = 64
        sys.path.insert(0, str(HERE))
        _gpu(args)
    else:
        _cpu(args)


if __name__ == "__main__":
    main()
