"""The LLaDA backbone: embedding, scanned bidirectional blocks, final RMSNorm, untied LM head."""

from __future__ import annotations

import jax
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes
from dultra_jax.model.block_stack import BlockStack, RematPolicy
from dultra_jax.model.layers import AttentionImpl, LayerKV, RMSNorm, rope_tables, trunc_normal


class LLaDA(nnx.Module):
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
        std = 1.0 / cfg.d_model**0.5
        self.embed = nnx.Embed(
            cfg.embedding_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
            embedding_init=axes.partitioned(trunc_normal(std), axes.VOCAB, axes.EMBED), rngs=rngs,
        )
        self.blocks = BlockStack(
            cfg, cfg.n_layers, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
            remat=remat, scan=scan_layers, rngs=rngs,
        )
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = nnx.Linear(
            cfg.d_model, cfg.embedding_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=axes.partitioned(trunc_normal(std), axes.EMBED, axes.VOCAB), rngs=rngs,
        )

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """(logits [B, L, V], hidden [B, L, D]) where hidden is the post-``ln_f`` state feeding the LM head."""
        hidden = self.hidden_states(input_ids, positions, mask)
        return self.lm_head(hidden), hidden

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array | None,
        cache: LayerKV | None = None,
        start: jax.Array | int | None = None,
        return_kv: bool = False,
    ):
        """The post-``ln_f`` states only; decoders apply the LM head to the positions they need (a block).

        ``input_ids``/``positions`` [B, W] may be a window of the canvas: with ``cache`` (every layer's K/V of
        the canvas, [n, B, N_kv, L, h]) the window attends to the cache outside it and to its own fresh K/V.
        ``return_kv`` also returns the window's fresh K/V (a full forward's: the cache).
        """
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        out = self.blocks(self.embed(input_ids), cos, sin, mask, cache, start, return_kv=return_kv)
        if return_kv:
            return self.final_norm(out[0]), out[1]
        return self.final_norm(out)
