"""A stack of identical transformer blocks with parameters stacked on a leading layer axis.

Stacking lets ``nnx.scan`` compile one block for all layers (fast compiles, small HLO) and lets remat
policies actually reduce memory (XLA honours remat inside a scan body, not across unrolled layers).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes
from dultra_jax.model.layers import AttentionImpl, Block

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockStack(nnx.Module):
    """``n`` LLaDA blocks; ``scan=True`` runs them with ``nnx.scan``, otherwise as an unrolled Python loop."""

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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        def body(block: Block, h: jax.Array) -> jax.Array:
            # Block boundary: pin the residual stream's layout (a no-op without a mesh and rules).
            return axes.constrain(block(axes.constrain(h, axes.BLD), cos, sin, mask), axes.BLD)

        if self.remat != "none":
            body = nnx.remat(body, policy=_POLICIES[self.remat])
        if self.scan:
            scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=axes.LAYER_TRANSFORM)
            return scan(self.layers, x)
        graphdef, state = nnx.split(self.layers)
        for i in range(self.n):
            x = body(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)), x)
        return x
