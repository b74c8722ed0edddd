"""Helpers shared by the benchmark scripts: device and commit, timing, the measured matmul rate, random-weight
models of a preset's shape, FLOP counts for the roofline, atomic JSON output.

Imports only the package and jax/flax/numpy, so the scripts run on a GPU image where the package is on
``PYTHONPATH`` but not installed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.atomic import write_atomic
from dultra_jax.config import ModelConfig, preset
from dultra_jax.decoding import kv_cache
from dultra_jax.decoding import loop as decode_loop
from dultra_jax.eval.env import device_name, git_commit
from dultra_jax.model import DUltra

RESULTS = Path(__file__).parent / "results"
# The decoding issue's CPU config: small enough for a laptop, shaped like the real model.
CPU_CONFIG = dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=2048,
                  embedding_size=2048, mask_token_id=2047, eos_token_id=2046, pad_token_id=2046,
                  max_sequence_length=1024)
RANDOM_MODELS = ("llada-8b", "tiny", "cpu")
STRATEGY_ARGS = {
    "planner": dict(strategy="planner", reveal="bernoulli"),
    "planner-topk": dict(strategy="planner", reveal="topk"),
    "threshold": dict(strategy="threshold", threshold=0.9),
    "factor": dict(strategy="factor", factor=1.0),
    "fixed": dict(strategy="fixed"),
}

__all__ = [
    "CPU_CONFIG", "RANDOM_MODELS", "RESULTS", "STRATEGY_ARGS", "commit", "device_name", "loop_programs",
    "matmul_params", "matmul_rate", "median_ms", "model_config", "random_model",
    "random_prompts", "write_json",
]


def commit() -> str:
    """Short hash of the checkout ("unknown" outside git)."""
    return git_commit()


def median_ms(fn, *args, warmup: int = 2, iters: int = 10, best: bool = False) -> float:
    """Median (or with ``best``, minimum) wall time in ms of ``fn(*args)`` with results blocked on."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.min(times) if best else np.median(times))


def matmul_rate(dtype, n: int, iters: int = 20, best: bool = False) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype``: the practical roofline of the device (median time,
    or the fastest run with ``best``: the peak, robust to other jobs sharing the machine)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / (median_ms(f, a, b, warmup=3, iters=iters, best=best) / 1e3)


def model_config(name: str, **overrides) -> ModelConfig:
    """``cpu`` (the decoding issue's CPU config), or a preset (``tiny``, ``llada-8b``)."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"--model must be one of {list(RANDOM_MODELS)} (random weights), got {name!r}")
    return preset("tiny", **{**CPU_CONFIG, **overrides}) if name == "cpu" else preset(name, **overrides)


def random_model(cfg: ModelConfig, dtype, seed: int = 0) -> DUltra:
    """Random weights of ``cfg``'s shape, created on the device (jitted init: no host copy of 8B parameters)."""
    return nnx.jit(lambda: DUltra(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))()


def random_prompts(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """[batch, length] ids of ordinary tokens (never MASK, end-of-text or pad)."""
    ids = np.random.default_rng(seed).integers(0, min(cfg.vocab_size, 32000), size=(batch, length))
    special = [i for i in (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) if i is not None]
    return np.where(np.isin(ids, special), 1, ids).astype(np.int32)


def matmul_params(model: DUltra) -> dict[str, int]:
    """Parameter counts: total, planner (and its per-position part), embedding, the backbone's matmul weights
    (blocks + LM head)."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    total = count(nnx.state(model, nnx.Param))
    planner = count(nnx.state(model.planner, nnx.Param))
    # per position: the planner's transformer layers and output projection; the timestep MLP and the AdaLN
    # modulations run once per row
    planner_tokens = count(nnx.state(model.planner.blocks, nnx.Param)) + count(nnx.state(model.planner.out, nnx.Param))
    cfg = model.cfg
    embed = cfg.embedding_size * cfg.d_model
    lm_head = cfg.embedding_size * cfg.d_model
    backbone = total - planner - embed
    return {"total": total, "planner": planner, "planner_per_position": planner_tokens, "embedding": embed,
            "lm_head": lm_head,
            "blocks": backbone - lm_head, "backbone_matmul": backbone}


def loop_programs(graphdef, *, batch: int, prompt: int, gen: int, block_length: int, mode: str, block: int = 0):
    """The decoding loop's own refresh and cached iteration of ``block``, jitted bare (no loop), each followed by
    the block's logits as the loop body does: ``(refresh, cached, shape)`` with
    ``refresh(state, x, mask_index, timestep) -> (logits, plan, cache)``,
    ``cached(state, x, mask_index, timestep, cache, s) -> (logits, plan)`` (``s``: dual's window start, traced as
    the loop passes it; prefix's is static) and ``shape`` = window, window_start and canvas widths."""
    dcfg = decode_loop.DecodeConfig(gen_length=gen, block_length=block_length, strategy="planner", cache=mode)
    length = prompt + gen
    rows = decode_loop.Rows(keys=None, length=jnp.full((batch,), float(length), jnp.float32), mask=None)
    start = jnp.full((batch,), prompt + block * block_length, jnp.int32)
    w_start, width = kv_cache.window_start_width(mode, prompt, gen, block_length, block)

    @jax.jit
    def refresh(state, x, mask_index, timestep):
        model = nnx.merge(graphdef, state)
        h, plan, cache = decode_loop._full_forward(model, x, rows, start, dcfg, mask_index, timestep)
        return model.lm_logits(h), plan, cache

    @jax.jit
    def cached(state, x, mask_index, timestep, cache, s):
        model = nnx.merge(graphdef, state)
        w = s if mode == "dual" else w_start
        h, plan = decode_loop._window_forward(model, x, rows, w, width, dcfg, mask_index, timestep, cache)
        return model.lm_logits(h), plan

    return refresh, cached, {"window": width, "window_start": w_start, "canvas": length}


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def time_decode(model, prompts, kw: dict, repeats: int):
    """(compile + first run seconds, median wall seconds, last result) of ``generate(model, prompts, **kw)``."""
    from dultra_jax.decoding import generate

    t0 = time.perf_counter()
    jax.block_until_ready(generate(model, prompts, **kw).tokens)
    compile_s = time.perf_counter() - t0
    walls, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = generate(model, prompts, **kw)
        jax.block_until_ready(result.tokens)
        walls.append(time.perf_counter() - t0)
    return compile_s, float(np.median(walls)), result
