"""Approximate block KV caching for the decoding loop (Fast-dLLM's prefix and dual caches, batched).

At the first iteration of every block the loop runs the model exactly over the whole canvas and keeps every
layer's keys (RoPE-rotated at their absolute positions) and values, for the backbone and for the planner
head. Later iterations of the block run both on a window only, attending to the cached K/V with the window's
own K/V written over them (through ``Block``/``BlockStack``'s ``cache``/``start``: the model's own layers):

- ``prefix``: the window is the current block and everything after it ([block_start, P+G)); the prompt and
  the finished blocks are served from the cache.
- ``dual``: the window is the current block only; the still-masked suffix is served from the cache too.

The cache is stale where tokens changed since the block began (the window positions are recomputed; the
cached positions' own K/V do not see the newly revealed tokens), which is the approximation Fast-dLLM makes.
The head's cache is stale in the same way and also in its timestep conditioning (the head's K/V outside the
window keep the timestep of the block's first iteration). The timestep and mask inputs of the head are
computed from the current canvas exactly as without a cache. Shapes are static: ``dual`` has a fixed window
of block_length; ``prefix`` has one window size per block, chosen with ``lax.switch`` (one compiled variant per
block). Under the ``sync`` schedule the cache is refreshed for the whole batch at once; under ``per_row`` each
row refreshes its own rows of the cache when it starts a block (``loop._per_row_cached``). A window attends to
the cache outside it and to its own fresh K/V (``layers.cached_attention``): the cache is read, never rewritten,
by a cached iteration.

Refresh policies (``DecodeConfig.refresh``): ``full`` (the default) recomputes the whole canvas at every block's
first iteration; ``suffix`` does so only at the run's first iteration, then at each later block recomputes from
the previous block onward (:func:`suffix_window`) against the cache before it, so the prompt's K/V stay those
of the first forward and a finished block's those of the iteration after it finished (cheaper by the prompt
and the blocks before the previous one; see docs/kv-cache.md for its measured agreement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax

from dultra_jax.model.layers import LayerKV

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES = ("none", "prefix", "dual")
RefreshPolicy = Literal["full", "suffix"]
REFRESH_POLICIES = ("full", "suffix")
# The canvas (position) axis of a cache buffer, from the end: [B, N_kv, L, h] per layer, [n, B, N_kv, L, h]
# stacked. Everything that slices, pads or writes a cache along the canvas goes through it.
POSITION_AXIS = -2


@jax.tree_util.register_dataclass
@dataclass
class DecodeCache:
    """The K/V a cached block iteration reads: refreshed at each block's first iteration."""

    # stacked [n_layers, B, n_kv_heads, P+G, head_dim], or (layer_loop="unrolled") a list of per-layer LayerKV
    # [B, n_kv_heads, P+G, head_dim]: each layer's buffer read in place
    backbone: LayerKV | list[LayerKV]
    head: LayerKV | list[LayerKV] | None  # as backbone for the head's layers; None for the baselines


def window_start_width(mode: CacheMode, p: int, g: int, block_length: int, block: int) -> tuple[int, int]:
    """Static (start, width) of the window run at a cached iteration of ``block``."""
    start = p + block * block_length
    return (start, block_length) if mode == "dual" else (start, p + g - start)


def suffix_window(p: int, g: int, block_length: int, block: int) -> tuple[int, int]:
    """Static (start, width) a ``suffix`` refresh recomputes at the first iteration of ``block`` >= 1: from the
    previous block (finished since the last refresh) to the end of the canvas."""
    start = p + (block - 1) * block_length
    return start, p + g - start


def write_window(cache: LayerKV | list[LayerKV], fresh: LayerKV | list[LayerKV], start: int) -> LayerKV | list:
    """The cache with the fresh K/V of a window written at canvas column ``start`` (stacked [n, B, N, W, h] or
    per-layer lists of [B, N, W, h]: along :data:`POSITION_AXIS` either way)."""
    def put(c, f):
        return jax.lax.dynamic_update_slice_in_dim(c, f.astype(c.dtype), start, axis=c.ndim + POSITION_AXIS)

    return jax.tree.map(put, cache, fresh)
