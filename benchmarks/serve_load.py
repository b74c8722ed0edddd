"""Bounded load on loopback against ``dultra serve``, and the same prompts through ``generate_many`` offline.

    python benchmarks/serve_load.py                                  # the embedded tiny model, 64 clients x 4
    python benchmarks/serve_load.py --model runs/demo/grpo/model --tokenizer DIR --clients 64 --requests 4

The server runs as a subprocess (``python -m dultra_jax.cli serve``); ``--clients`` concurrent clients each
send ``--requests`` streaming completions (token-id prompts of mixed lengths, uniform in [--min-len,
--max-len], each with its own seed) with the ``openai`` async client. The whole load runs twice: the first pass
compiles every program the load needs, the second is timed. Reports requests/s, decoded tokens/s (gen_length
per request, as offline), p50/p99 latency, p50/p99 time to first chunk, errors (must be 0), and the served
tokens/s against ``generate_many`` over the same prompts and seeds in this process (warm, same slots): the
server's overhead (goal >= 0.8x). Table + JSON in benchmarks/results/. The JSON names the decode engine the
server used and the machine's load average: timings on a shared machine are not comparable across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from _common import RESULTS, commit, device_name, write_json

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = ROOT / "tests" / "fixtures" / "llada-tokenizer-tiny"


def tiny_text_model(dst: Path) -> Path:
    """The embedded tiny checkpoint beside the tiny LLaDA tokenizer (ids match the model's)."""
    from dultra_jax.cli import embedded_checkpoint

    dst.mkdir(parents=True, exist_ok=True)
    for f in embedded_checkpoint().iterdir():
        shutil.copy(f, dst / f.name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_TOKENIZER / name, dst / name)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, prompt, seed, kw) -> tuple[float, float, bool]:
    """(latency s, time to first chunk s, ok) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    try:
        stream = await client.completions.create(model="bench", prompt=prompt, seed=seed, stream=True, **kw)
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
        lat = time.perf_counter() - t0
        return lat, lat if first is None else first, True
    except Exception as e:  # counted, never hidden
        print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
        return time.perf_counter() - t0, float("nan"), False


async def load(base: str, prompts, seeds, clients: int, kw) -> tuple[float, list]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    per = len(prompts) // clients

    async def worker(c):
        return [await one(client, prompts[c * per + k], seeds[c * per + k], kw) for k in range(per)]

    t0 = time.perf_counter()
    out = await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return wall, [r for rs in out for r in rs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory when the checkpoint has none")
    ap.add_argument("--name", default="tiny", help="label of the results file")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--strategy", default="planner")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--warm-passes", type=int, default=1,
                    help="untimed passes of the same load first (each arrival order compiles the width changes it "
                         "meets: the engine compiles per prompt width and per widening)")
    args = ap.parse_args()
    sha = commit()  # the code that runs (read before anything else can move HEAD)

    from dultra_jax.decoding import generate_many
    from dultra_jax.text import TextModel

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = Path(args.model) if args.model else tiny_text_model(tmp / "tiny")
    text = TextModel.load(model_dir, dtype=args.dtype, tokenizer=args.tokenizer, slots=args.slots,
                          gen_length=args.gen_length, block_length=args.block_length, strategy=args.strategy)
    n = args.clients * args.requests
    rng = np.random.default_rng(0)
    vocab = min(len(text.tokenizer), text.model.cfg.mask_token_id)
    excluded = set(text.excluded)
    pool = np.asarray([i for i in range(vocab) if i not in excluded])
    prompts = [rng.choice(pool, size=int(rng.integers(args.min_len, args.max_len + 1))).tolist() for _ in range(n)]
    seeds = list(range(n))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dultra_jax.cli", "serve", "--model", str(model_dir), "--dtype", args.dtype,
           "--gen-length", str(args.gen_length), "--block-length", str(args.block_length), "--strategy",
           args.strategy, "--slots", str(args.slots), "--max-queue", str(n), "--port", str(port),
           "--served-model-name", "bench", "--log-level", "warning"]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server was not ready in 600 s")
            time.sleep(0.5)
        engine = httpx.get(f"{base}/health").json().get("engine", "?")
        for _ in range(args.warm_passes):  # compiles the programs the load needs
            asyncio.run(load(base, prompts, seeds, args.clients, {}))
        load_avg = os.getloadavg()[0]
        wall, results = asyncio.run(load(base, prompts, seeds, args.clients, {}))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    lat = np.asarray([r[0] for r in results])
    ttfc = np.asarray([r[1] for r in results if r[2]])
    errors = sum(not r[2] for r in results)

    kw = {k: getattr(text.defaults, k) for k in ("gen_length", "block_length", "strategy")}
    generate_many(text.model, prompts, slots=args.slots, row_seeds=seeds, **kw)  # compile
    t0 = time.perf_counter()
    generate_many(text.model, prompts, slots=args.slots, row_seeds=seeds, **kw)
    offline_s = time.perf_counter() - t0

    tokens = n * args.gen_length
    row = dict(clients=args.clients, requests_per_client=args.requests, requests=n, errors=int(errors),
               wall_s=wall, requests_per_s=n / wall, tokens_per_s=tokens / wall,
               latency_p50_s=float(np.percentile(lat, 50)), latency_p99_s=float(np.percentile(lat, 99)),
               first_chunk_p50_s=float(np.percentile(ttfc, 50)) if ttfc.size else None,
               first_chunk_p99_s=float(np.percentile(ttfc, 99)) if ttfc.size else None,
               offline_wall_s=offline_s, offline_tokens_per_s=tokens / offline_s,
               served_vs_offline=(tokens / wall) / (tokens / offline_s), server_exit_code=code)
    out = dict(model=str(args.model or "embedded tiny (lladou-tiny + llada-tokenizer-tiny)"), device=device_name(),
               dtype=args.dtype, commit=sha, engine=engine, slots=args.slots, gen_length=args.gen_length,
               block_length=args.block_length, strategy=args.strategy, prompt_lengths=[args.min_len, args.max_len],
               load_average_1min=load_avg, cpu_count=os.cpu_count(),
               versions={p: metadata.version(p) for p in ("jax", "fastapi", "uvicorn", "openai")},
               warm_passes=args.warm_passes,
               note=f"the pass after {args.warm_passes} identical untimed one(s) (they compile); tokens = gen_length "
                    "decoded positions per request; offline = generate_many in the benchmark's process, prompts "
                    "sorted by length; measured on a shared machine (see load_average_1min)", rows=[row])
    path = RESULTS / f"serve_load_{args.name}.json"
    write_json(path, out)
    print(f"{n} requests ({args.clients} clients x {args.requests}), engine {engine}, {args.slots} slots: "
          f"{row['requests_per_s']:.1f} req/s, {row['tokens_per_s']:.0f} tok/s, p50 {row['latency_p50_s']:.2f} s, "
          f"p99 {row['latency_p99_s']:.2f} s, errors {errors}; offline generate_many {row['offline_tokens_per_s']:.0f} "
          f"tok/s -> served/offline {row['served_vs_offline']:.2f}x; wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
