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
row refreshes its own rows of the cache when it starts a block (``loop._per_row_cached``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax

from dultra_jax.model.layers import LayerKV

CacheMode = Literal["none", "prefix", "dual"]
CACHE_MODES = ("none", "prefix", "dual")


@jax.tree_util.register_dataclass
@dataclass
class DecodeCache:
    """The K/V a cached block iteration reads: refreshed at each block's first iteration."""

    backbone: LayerKV  # [n_layers, B, P+G, n_kv_heads, head_dim]
    head: LayerKV | None  # [num_head_layers, B, P+G, n_kv_heads, head_dim]; None for the baselines


def window_start_width(mode: CacheMode, p: int, g: int, block_length: int, block: int) -> tuple[int, int]:
    """Static (start, width) of the window run at a cached iteration of ``block``."""
    start = p + block * block_length
    return (start, block_length) if mode == "dual" else (start, p + g - start)
