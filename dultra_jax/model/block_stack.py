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
from dultra_jax.model.layers import AttentionImpl, Block

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

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        # The scan is over the pure (graphdef, stacked state) pair, each layer merged inside the body: the
        # functional form of nnx.scan, which also composes with any enclosing transform (the decoding
        # while_loop, the GRPO replay scan under grad) without NNX's trace-level checks on closed-over modules.
        graphdef, stacked = nnx.split(self.layers)

        def body(h: jax.Array, layer_state) -> tuple[jax.Array, None]:
            block = nnx.merge(graphdef, layer_state)
            # Block boundary: pin the residual stream's layout (a no-op without a mesh and rules).
            return axes.constrain(block(axes.constrain(h, axes.BLD), cos, sin, mask), axes.BLD), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_POLICIES[self.remat])
        if self.scan:
            return jax.lax.scan(body, x, stacked)[0]
        for i in range(self.n):
            x = body(x, jax.tree.map(lambda a, i=i: a[i], stacked))[0]
        return x
