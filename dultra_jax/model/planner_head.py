"""dUltra's unmasking planner head: one fp32 logit per position saying "reveal me now".

timestep t -> sinusoidal features (cos, sin) -> MLP -> temb [B, D] (+ mask embedding per token) -> AdaLN
conditioning around one or more LLaDA blocks over the backbone's final hidden states -> linear -> logit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes
from dultra_jax.model.block_stack import BlockStack, RematPolicy
from dultra_jax.model.layers import AttentionImpl, rope_tables, trunc_normal


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[B] fractions in [0, 1] -> [B, dim] float32 features, cos first (the original's order)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    feats = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        feats = jnp.concatenate([feats, jnp.zeros_like(feats[:, :1])], axis=-1)
    return feats


class AdaLN(nnx.Module):
    """Parameter-free LayerNorm (float32 statistics) modulated as LN(x) * (1 + scale) + shift."""

    def __init__(self, d: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.modulation = nnx.Linear(
            d, 2 * d, dtype=dtype, param_dtype=param_dtype,
            kernel_init=axes.partitioned(nnx.initializers.xavier_uniform(), axes.EMBED, axes.ADALN),
            bias_init=axes.partitioned(nnx.initializers.zeros_init(), axes.ADALN), rngs=rngs,
        )

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.modulation(temb), 2, axis=-1)
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        normed = ((x32 - mu) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return normed * (1 + scale) + shift


class PlannerHead(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype,
        param_dtype,
        attention_impl: AttentionImpl = "auto",
        remat: RematPolicy = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.d_model
        xavier, zeros = nnx.initializers.xavier_uniform(), nnx.initializers.zeros_init()

        def lin(d_in, d_out, names, init=xavier):
            return nnx.Linear(
                d_in, d_out, dtype=dtype, param_dtype=param_dtype, kernel_init=axes.partitioned(init, *names),
                bias_init=axes.partitioned(zeros, names[1]), rngs=rngs,
            )

        def embedding():
            return nnx.Embed(
                2, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                embedding_init=axes.partitioned(trunc_normal(0.02, cutoff=2.0), axes.MASK_TYPES, axes.EMBED),
            )

        # The timestep MLP is 256 -> D -> D: its hidden axis is sharded like an MLP's.
        self.time_in = lin(cfg.timestep_features, d, (axes.TIME_FEATURES, axes.MLP))
        self.time_out = lin(d, d, (axes.MLP, axes.EMBED))
        self.mask_embedding = embedding() if cfg.use_mask_embeddings else None
        self.block_embedding = embedding() if cfg.use_block_embeddings else None
        self.adaln_in = AdaLN(d, cfg.planner_layernorm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = BlockStack(
            cfg, cfg.num_head_layers, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
            remat=remat, scan=scan_layers, rngs=rngs,
        )
        self.adaln_out = AdaLN(d, cfg.planner_layernorm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out = lin(d, 1, (axes.EMBED, axes.PLANNER_OUT), nnx.initializers.normal(0.02))

    def __call__(
        self,
        hidden: jax.Array,
        timestep: jax.Array,
        mask_index: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        current_block: jax.Array | None = None,
    ) -> jax.Array:
        """Planner logits [B, L] float32 for hidden [B, L, D], timestep [B], mask_index [B, L] (bool)."""
        feats = timestep_features(timestep, self.cfg.timestep_features).astype(self.dtype)
        temb = self.time_out(jax.nn.silu(self.time_in(feats)))[:, None, :]
        if self.mask_embedding is not None:
            temb = temb + self.mask_embedding(mask_index.astype(jnp.int32))
        if self.block_embedding is not None:
            if current_block is None:
                raise ValueError("this planner uses block embeddings (use_block_embeddings=true): pass current_block")
            temb = temb + self.block_embedding(current_block.astype(jnp.int32))
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        f = axes.constrain(self.adaln_in(hidden.astype(self.dtype), temb), axes.BLD)
        f = self.blocks(f, cos, sin, mask)
        f = axes.constrain(self.adaln_out(f, temb), axes.BLD)
        return axes.constrain(self.out(f)[..., 0].astype(jnp.float32), (axes.ACT_BATCH, axes.ACT_LENGTH))
