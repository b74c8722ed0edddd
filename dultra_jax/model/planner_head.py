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
from dultra_jax.model.layers import AttentionImpl, LayerKV, rope_tables, take_positions, trunc_normal


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

    def __call__(self, x: jax.Array, table: jax.Array, index: jax.Array) -> jax.Array:
        """x [B, W, D]; ``table`` [B, K, D] the K distinct conditioning vectors of each row, ``index`` [B, W]
        which one each position uses. The modulation runs on the table, then is gathered per position."""
        mod = take_positions(self.modulation(table), index)
        scale, shift = jnp.split(mod, 2, axis=-1)
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
        query: jax.Array | int | None = None,
        cache: LayerKV | None = None,
        start: jax.Array | int | None = None,
        return_kv: bool = False,
    ):
        """Planner logits float32 for hidden [B, W, D], timestep [B], mask_index [B, W] (bool).

        ``query`` [B, Q] (indices into the W positions; a static int Q: the first Q) computes the logits of those
        positions only: the layers' keys/values still cover all W positions (and the ``cache``, as in the
        backbone), so this is exact. Returns [B, Q or W] logits, and with ``return_kv`` also the layers' fresh
        K/V of the W positions.
        """
        table, index = self.conditioning(timestep, mask_index, current_block)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        f = axes.constrain(self.adaln_in(hidden.astype(self.dtype), table, index), axes.BLD)
        out = self.blocks(f, cos, sin, mask, cache, start, query, return_kv=return_kv)
        f, kv = out if return_kv else (out, None)
        if query is not None:
            index = take_positions(index, query)
        f = axes.constrain(self.adaln_out(f, table, index), axes.BLD)
        logits = axes.constrain(self.out(f)[..., 0].astype(jnp.float32), (axes.ACT_BATCH, axes.ACT_LENGTH))
        return (logits, kv) if return_kv else logits

    def conditioning(
        self, timestep: jax.Array, mask_index: jax.Array, current_block: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """(table [B, K, D], index [B, W]): temb + mask / block embedding takes at most K = 4 distinct values per
        row (mask x block flags), so the AdaLN modulations are computed K times per row instead of per token."""
        feats = timestep_features(timestep, self.cfg.timestep_features).astype(self.dtype)
        temb = self.time_out(jax.nn.silu(self.time_in(feats)))[:, None, :]  # [B, 1, D]
        index = jnp.zeros(mask_index.shape, jnp.int32)
        if self.mask_embedding is not None:
            temb = temb + self.mask_embedding(jnp.arange(2))[None]  # [B, 2, D]
            index = mask_index.astype(jnp.int32)
        if self.block_embedding is not None:
            if current_block is None:
                raise ValueError("this planner uses block embeddings (use_block_embeddings=true): pass current_block")
            k = temb.shape[1]
            temb = (temb[:, None, :, :] + self.block_embedding(jnp.arange(2))[None, :, None, :]).reshape(
                temb.shape[0], 2 * k, -1)
            index = index + k * current_block.astype(jnp.int32)
        return temb, index
