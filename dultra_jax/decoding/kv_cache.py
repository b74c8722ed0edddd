"""Approximate block KV caching for the decoding loop (Fast-dLLM's prefix and dual caches, batched).

At the first iteration of every block the loop runs one full forward that also returns every layer's keys
(RoPE-rotated at their absolute positions) and values. Later iterations of the block run the backbone on a
window only, attending to the cached K/V with the window's own K/V written over them:

- ``prefix``: the window is the current block and everything after it ([block_start, P+G)); the prompt and
  the finished blocks are served from the cache.
- ``dual``: the window is the current block only; the still-masked suffix is served from the cache too.

The cache is stale where tokens changed since the block began (the window positions are recomputed; the
cached positions' own K/V do not see the newly revealed tokens), which is the approximation Fast-dLLM makes.
Shapes are static: ``dual`` has a fixed window of block_length; ``prefix`` has one window size per block,
chosen with ``lax.switch`` (one compiled variant per block).

The planner head scores positions from the final hidden states of the whole canvas: fresh for the window,
and for the other positions the states of the block's full forward. Its timestep and mask inputs are computed
from the current canvas exactly as without a cache, and the head itself runs uncached over all positions.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.model.dultra import DUltra
from dultra_jax.model.layers import attention, positions_and_mask, rope_tables

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES = ("none", "prefix", "dual")


def _layers(model: DUltra):
    return nnx.split(model.backbone.blocks.layers)


def forward_with_kv(model: DUltra, ids: jax.Array, attention_mask: jax.Array | None):
    """Full forward that also returns the cache: (hidden [B, L, D], K, V [n_layers, B, L, kv_heads, h])."""
    b, length = ids.shape
    positions, mask = positions_and_mask(b, length, attention_mask)
    cos, sin = rope_tables(positions, model.cfg.head_dim, model.cfg.rope_theta)
    graphdef, stacked = _layers(model)

    def layer(x, params):
        blk = nnx.merge(graphdef, params)
        q, k, v = blk.qkv(x, cos, sin)
        return blk.finish(x, attention(q, k, v, mask, blk.attention_impl)), (k, v)

    x, (keys, values) = jax.lax.scan(layer, model.backbone.embed(ids), stacked)
    return model.backbone.final_norm(x), keys, values


def window_forward(
    model: DUltra,
    ids: jax.Array,
    start: jax.Array,
    width: int,
    keys: jax.Array,
    values: jax.Array,
    attention_mask: jax.Array | None,
) -> jax.Array:
    """Hidden states [B, width, D] of canvas positions [start, start + width), attending to the cached K/V
    of every other position and to the window's fresh K/V."""
    b, length = ids.shape
    positions, mask = positions_and_mask(b, length, attention_mask)
    win_pos = jax.lax.dynamic_slice_in_dim(positions, start, width, axis=1)
    cos, sin = rope_tables(win_pos, model.cfg.head_dim, model.cfg.rope_theta)
    graphdef, stacked = _layers(model)
    x = model.backbone.embed(jax.lax.dynamic_slice_in_dim(ids, start, width, axis=1))

    def layer(x, inputs):
        params, k_cache, v_cache = inputs
        blk = nnx.merge(graphdef, params)
        q, k, v = blk.qkv(x, cos, sin)
        k_all = jax.lax.dynamic_update_slice_in_dim(k_cache, k, start, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_cache, v, start, axis=1)
        return blk.finish(x, attention(q, k_all, v_all, mask, blk.attention_impl)), None

    x, _ = jax.lax.scan(layer, x, (stacked, keys, values))
    return model.backbone.final_norm(x)


def window_start_width(mode: CacheMode, p: int, g: int, block_length: int, block: int) -> tuple[int, int]:
    """Static (start, width) of the window run at a cached iteration of ``block``."""
    start = p + block * block_length
    return (start, block_length) if mode == "dual" else (start, p + g - start)


def cached_hidden(
    model: DUltra,
    mode: CacheMode,
    ids: jax.Array,
    block: jax.Array,
    p: int,
    g: int,
    block_length: int,
    hidden_cache: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    attention_mask: jax.Array | None,
) -> jax.Array:
    """Whole-canvas hidden states for a cached iteration: the window's fresh states over ``hidden_cache``."""
    if mode == "dual":
        start = p + block * block_length
        fresh = window_forward(model, ids, start, block_length, keys, values, attention_mask)
        return jax.lax.dynamic_update_slice_in_dim(hidden_cache, fresh, start, axis=1)

    def branch(b):
        start, width = window_start_width("prefix", p, g, block_length, b)

        def run(ids, hidden_cache, keys, values):
            fresh = window_forward(model, ids, jnp.int32(start), width, keys, values, attention_mask)
            return jax.lax.dynamic_update_slice_in_dim(hidden_cache, fresh, start, axis=1)

        return run

    branches = [branch(b) for b in range(g // block_length)]
    return jax.lax.switch(block, branches, ids, hidden_cache, keys, values)


def forward_cost(cfg, length: int, queries: int) -> float:
    """Matmul + attention FLOPs of a backbone forward of ``queries`` positions over ``length`` keys."""
    d, f = cfg.d_model, cfg.mlp_hidden_size
    per_token = 2 * (2 * d * d + 2 * d * cfg.kv_dim + 3 * d * f)
    return cfg.n_layers * queries * (per_token + 4 * length * d)
