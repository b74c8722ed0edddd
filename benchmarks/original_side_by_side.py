"""Our decoders against the original's PyTorch planner decoder, on the same weights, prompts and coin flips.

    python benchmarks/original_side_by_side.py --torch-python /path/to/venv-with-torch/bin/python

The original's decoder (benchmarks/original_torch.py, run by an interpreter that has torch: never a dependency
of the package) must first reproduce the original's golden outputs (tests/fixtures/lladou-tiny); it is then
given the random-weight model of the decoding benchmark's CPU config, exported in the original's checkpoint
format. Both sides decode the same prompts at temperature 0 with the same Bernoulli draws (``uniforms``), so
the exact planner takes the same decisions on both sides (token agreement reported) and the cached variants
differ only by their cache's approximation. The two run in separate processes, never at the same time:
every variant once per round, ``--rounds`` alternating rounds, medians. Table + JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from _common import RESULTS, commit, device_name, model_config, random_model, random_prompts, write_json

from dultra_jax.checkpoints.hf import export_hf
from dultra_jax.decoding import generate

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "tests" / "fixtures" / "lladou-tiny"
# name -> generate() settings; every variant is the planner's Bernoulli rule at temperature 0 (the paper's eval)
VARIANTS = {
    "exact": dict(cache="none"),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "dual_refresh_suffix": dict(cache="dual", refresh="suffix"),
    "dual_unrolled": dict(cache="dual", layer_loop="unrolled"),
}


# Idle time before every timed run: the other side's thread pool (OpenMP in torch, by default) keeps spinning
# on the cores for a while after its last parallel region, and would be timed as ours (measured: +30% on our
# exact run without it).
SETTLE_S = 1.0


class TorchWorker:
    """The original's decoder in its own process, driven one JSON command at a time."""

    def __init__(self, python: str):
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        self.proc = subprocess.Popen([python, str(HERE / "original_torch.py"), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the PyTorch worker exited (code {self.proc.wait()}): see its error above")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", default=os.environ.get("DULTRA_TORCH_PYTHON"),
                    help="an interpreter with torch installed (or set DULTRA_TORCH_PYTHON)")
    ap.add_argument("--model", default="cpu", help="cpu (the decoding issue's CPU config) | tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.torch_python:
        sys.exit("--torch-python is required: an interpreter with torch==2.13.0 (e.g. a separate venv)")
    if args.rounds < 1:
        sys.exit(f"--rounds must be at least 1, got {args.rounds}")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if unknown := [n for n in names if n not in VARIANTS]:
        sys.exit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    try:
        probe = subprocess.run([args.torch_python, "-c", "import torch, safetensors"], capture_output=True, timeout=120)
    except OSError as e:
        sys.exit(f"--torch-python {args.torch_python!r} cannot be run ({e.strerror}): pass an interpreter with torch")
    if probe.returncode != 0:
        sys.exit(f"--torch-python {args.torch_python!r} cannot import torch and safetensors: install them there "
                 "(pip install torch==2.13.0 safetensors numpy)")
    if jax.default_backend() != "cpu":
        sys.exit("this comparison runs on the CPU (the PyTorch side is the original's CPU fp32 path)")

    cfg = model_config(args.model)
    b, p, g, bl = args.batch, args.prompt_len, args.gen_len, args.block
    model = random_model(cfg, np.float32)
    prompts = random_prompts(cfg, b, p)
    uniforms = np.random.default_rng(1).random((g, b, p + g), dtype=np.float32)  # >= any iteration count
    worker = TorchWorker(args.torch_python)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        golden = worker.ask(op="golden", fixture=str(FIXTURE))
        if not golden["ok"]:
            worker.close()
            sys.exit(f"the PyTorch port does not reproduce the original's golden outputs: {golden['checks']}")
        export_hf(model, tmp / "weights", dtype=np.float32)
        loaded = worker.ask(op="load", dir=str(tmp / "weights"))
        np.save(tmp / "prompts.npy", prompts.astype(np.int64))
        np.save(tmp / "uniforms.npy", uniforms)
        torch_cmd = dict(op="decode", prompts=str(tmp / "prompts.npy"), uniforms=str(tmp / "uniforms.npy"),
                         gen_length=g, block_length=bl, out=str(tmp / "original.npy"))
        kws = {n: dict(VARIANTS[n], gen_length=g, block_length=bl, strategy="planner", reveal="bernoulli",
                       temperature=0.0, uniforms=uniforms) for n in names}
        results = {}
        for n, kw in kws.items():  # compile + one run of every variant, one warm-up run of the original
            results[n] = generate(model, prompts, **kw)
            jax.block_until_ready(results[n].tokens)
        first = worker.ask(**torch_cmd)
        original_tokens = np.load(tmp / "original.npy")
        walls: dict[str, list[float]] = {n: [] for n in ["original", *names]}
        for r in range(args.rounds):
            time.sleep(SETTLE_S)
            walls["original"].append(worker.ask(**torch_cmd)["wall_s"])
            for n, kw in kws.items():
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                jax.block_until_ready(generate(model, prompts, **kw).tokens)
                walls[n].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in walls.items()),
                  flush=True)
        worker.close()

    gen = slice(p, p + g)
    original_wall = float(np.median(walls["original"]))
    original_iters = int(first["iterations"])
    rows = [{"variant": "original (PyTorch)", "iterations": original_iters, "wall_s": round(original_wall, 4),
             "wall_s_rounds": [round(w, 4) for w in walls["original"]],
             "ms_per_iteration": round(1e3 * original_wall / original_iters, 3), "vs_original": 1.0,
             "vs_original_per_iteration": 1.0, "agreement_with_original": 1.0, "agreement_with_dual": None}]
    for n in names:
        res = results[n]
        wall = float(np.median(walls[n]))
        iters = int(res.iterations)
        tokens = np.asarray(res.tokens)
        rows.append({
            "variant": n, **VARIANTS[n], "iterations": iters,
            "wall_s": round(wall, 4), "wall_s_rounds": [round(w, 4) for w in walls[n]],
            "ms_per_iteration": round(1e3 * wall / iters, 3),
            "vs_original": round(original_wall / wall, 3),
            "vs_original_per_iteration": round((original_wall / original_iters) / (wall / iters), 3),
            "agreement_with_original": round(float((tokens[:, gen] == original_tokens[:, gen]).mean()), 4),
            "agreement_with_dual": (round(float((tokens[:, gen] == np.asarray(results["dual"].tokens)[:, gen]).mean()),
                                          4) if "dual" in results else None),
        })
    by = {r["variant"]: r for r in rows}
    targets = {f"{n}_vs_original": by[n]["vs_original"] for n in names}
    result = {
        "benchmark": "original_side_by_side", "device": device_name(), "jax": jax.__version__,
        "torch": loaded["torch"], "torch_threads": loaded["threads"], "commit": commit(), "model": args.model,
        "dtype": "float32", "batch": b, "prompt_len": p, "gen_len": g, "block": bl, "rounds": args.rounds,
        "golden_checks": golden["checks"], "targets": targets, "rows": rows,
        "note": ("the original's planner decoder (benchmarks/original_torch.py, checked against the original's "
                 "golden outputs first) vs ours, same random weights, prompts and Bernoulli draws, temperature 0; "
                 f"separate processes never running together, {args.rounds} alternating rounds, medians"),
    }
    print(f"{result['device']}  torch {loaded['torch']} ({loaded['threads']} threads), jax {jax.__version__}  "
          f"{args.model} fp32 B={b} P={p} G={g} block={bl}  ({args.rounds} alternating rounds, medians)")
    print(f"{'variant':>20} {'iters':>6} {'wall s':>8} {'ms/iter':>8} {'x orig':>7} {'x /iter':>8} "
          f"{'agree orig':>10} {'agree dual':>10}")
    for r in rows:
        dual = f"{r['agreement_with_dual']:10.2%}" if r["agreement_with_dual"] is not None else f"{'-':>10}"
        print(f"{r['variant']:>20} {r['iterations']:6d} {r['wall_s']:8.3f} {r['ms_per_iteration']:8.2f} "
              f"{r['vs_original']:6.2f}x {r['vs_original_per_iteration']:7.2f}x {r['agreement_with_original']:10.2%} "
              f"{dual}")
    out = Path(args.out) if args.out else RESULTS / f"original_side_by_side_{args.model}_b{b}_cpu.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
