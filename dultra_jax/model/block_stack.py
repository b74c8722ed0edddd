"""A stack of identical transformer blocks with parameters stacked on a leading layer axis.

Stacking lets a scan compile one block for all layers (fast compiles, small HLO) and lets remat
policies actually reduce memory (XLA honours remat inside a scan body, not across unrolled layers).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes
from dultra_jax.model.layers import AttentionImpl, Block, LayerKV, Query

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockStack(nnx.Module):
    """``n`` LLaDA blocks; ``scan=True`` scans them (one compiled block), otherwise an unrolled Python loop."""

    def __init__(
        self,
        cfg: ModelConfig,
        n: int,
        *,
        dtype,
        param_dtype,
        attention_impl: AttentionImpl = "auto",
        remat: RematPolicy = "none",
        scan: bool = True,
        rngs: nnx.Rngs,
    ):
        if remat not in ("none", *_POLICIES):
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {['none', *_POLICIES]}")
        self.n = n
        self.remat = remat
        self.scan = scan

        # transform_metadata puts the stacked axis' logical name in front of every parameter's names.
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata=axes.LAYER_TRANSFORM)
        def make(layer_id, rngs):
            return Block(cfg, layer_id, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)

        self.layers = make(jnp.arange(n), rngs)

    def unstack(self) -> None:
        """Give every layer its own parameter buffers (an ``nnx.List`` of Blocks; called inside a jitted decoder,
        once, outside its iteration loop): a stacked layer loop, scanned or unrolled, slices each layer's weights
        out of the stack into a new buffer at every call, which a decode iteration pays in bytes moved (3x the
        weight reads). Costs one copy of the stack's parameters for as long as the unstacked model lives."""
        if isinstance(self.layers, nnx.List):
            return
        graphdef, stacked = nnx.split(self.layers)
        self.layers = nnx.List(
            [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(self.n)])

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        cache: LayerKV | None = None,
        start: jax.Array | int | None = None,
        query: Query | None = None,
        return_kv: bool = False,
    ):
        """The blocks over positions ``x`` [B, W, D]; see :meth:`Block.__call__` for ``cache``/``start``.

        ``cache`` holds every layer's K/V [n, B, N_kv, L, h]. ``query`` [B, Q] restricts the *last* layer's
        queries and MLP to those positions (the earlier layers' outputs are the last layer's keys/values, so
        they run everywhere). Returns the states [B, Q or W, D], and with ``return_kv`` also the stacked fresh
        K/V of the W positions (the cache a full forward fills).
        """
        if isinstance(self.layers, nnx.List):
            return self._unstacked(x, cos, sin, mask, cache, start, query, return_kv)
        # The scan is over the pure (graphdef, stacked state) pair, each layer merged inside the body: the
        # functional form of nnx.scan, which also composes with any enclosing transform (the decoding
        # while_loop, the GRPO replay scan under grad) without NNX's trace-level checks on closed-over modules.
        graphdef, stacked = nnx.split(self.layers)

        def layer(h: jax.Array, layer_state, layer_cache, q_index):
            block = nnx.merge(graphdef, layer_state)
            # Block boundary: pin the residual stream's layout (a no-op without a mesh and rules).
            out, kv = block(axes.constrain(h, axes.BLD), cos, sin, mask, layer_cache, start, q_index)
            return axes.constrain(out, axes.BLD), kv

        if self.remat != "none":
            layer = jax.checkpoint(layer, policy=_POLICIES[self.remat])

        def body(h, xs):
            out, kv = layer(h, *xs, None)
            return out, kv if return_kv else None

        def run(h, params, kv, n):
            if n == 0:
                return h, None
            if self.scan:
                return jax.lax.scan(body, h, (params, kv))
            outs = []
            for i in range(n):
                h, kv_i = body(h, jax.tree.map(lambda a, i=i: a[i], (params, kv)))
                outs.append(kv_i)
            return h, None if not return_kv else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        if query is None:
            x, kvs = run(x, stacked, cache, self.n)
        else:
            head = jax.tree.map(lambda a: a[:-1], (stacked, cache))
            last = jax.tree.map(lambda a: a[-1], (stacked, cache))
            x, kvs = run(x, *head, self.n - 1)
            x, kv_last = layer(x, *last, query)
            if return_kv:
                kv_last = jax.tree.map(lambda a: a[None], kv_last)
                kvs = kv_last if kvs is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), kvs, kv_last)
        return (x, kvs) if return_kv else x

    def _unstacked(self, x, cos, sin, mask, cache, start, query, return_kv):
        """The layer loop over per-layer Blocks (after :meth:`unstack`): unrolled, each weight read in place.
        ``cache`` is stacked [n, ...] or a list of per-layer LayerKV (read in place, as the weights); with
        ``return_kv`` the fresh K/V come back as such a list."""
        kvs = []
        for i, block in enumerate(self.layers):
            if cache is None or isinstance(cache, list):
                layer_cache = None if cache is None else cache[i]
            else:
                layer_cache = jax.tree.map(lambda a, i=i: a[i], cache)
            q_index = query if i == self.n - 1 else None
            x, kv = block(axes.constrain(x, axes.BLD), cos, sin, mask, layer_cache, start, q_index)
            x = axes.constrain(x, axes.BLD)
            kvs.append(kv)
        return (x, kvs) if return_kv else x
