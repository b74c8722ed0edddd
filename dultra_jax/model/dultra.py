"""The dUltra model: LLaDA backbone + unmasking planner head, and pure jitted entry points over it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.model.backbone import LLaDA
from dultra_jax.model.block_stack import RematPolicy
from dultra_jax.model.layers import AttentionImpl, positions_and_mask
from dultra_jax.model.planner_head import PlannerHead


class DUltra(nnx.Module):
    """Backbone + planner head.

    ``dtype`` is the compute dtype (bf16 for real runs, fp32 for parity tests); ``param_dtype`` the storage
    dtype of the parameters (defaults to ``dtype``; fp32 master weights with bf16 compute for training).
    ``attention_mask`` everywhere is optional: ``None`` reproduces the original, which ignores padding; a 0/1
    [B, L] key-padding mask makes each left-padded row compute exactly what it computes unpadded.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        attention_impl: AttentionImpl = "auto",
        remat: RematPolicy = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, remat=remat,
                  scan_layers=scan_layers, rngs=rngs)
        self.backbone = LLaDA(cfg, **kw)
        self.planner = PlannerHead(cfg, **kw)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(logits [B, L, V], hidden [B, L, D]); hidden is the final-norm state the LM head and planner read."""
        input_ids = _check_ids(input_ids, "input_ids")
        positions, mask = positions_and_mask(*input_ids.shape, attention_mask)
        return self.backbone(input_ids, positions, mask)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Final-norm states [B, L, D] without the LM head (decoders project only the current block)."""
        input_ids = _check_ids(input_ids, "input_ids")
        positions, mask = positions_and_mask(*input_ids.shape, attention_mask)
        return self.backbone.hidden_states(input_ids, positions, mask)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits for any subset of hidden states [..., D] -> [..., V]."""
        return self.backbone.lm_head(hidden)

    def planner_logits(
        self,
        hidden: jax.Array,
        timestep: jax.Array,
        mask_index: jax.Array,
        attention_mask: jax.Array | None = None,
        current_block: jax.Array | None = None,
        query_cols: jax.Array | None = None,
    ) -> jax.Array:
        """float32 [B, L] reveal logits; ``timestep`` [B] is the fraction of non-MASK tokens in each row.

        ``query_cols`` [B, Q] (canvas columns per row, e.g. the current block) returns [B, Q]: the same logits
        for those positions only, computing the head's queries, outputs and MLP there alone (exact).
        """
        if hidden.ndim != 3 or hidden.shape[-1] != self.cfg.d_model:
            raise ValueError(f"hidden must be [B, L, {self.cfg.d_model}], got shape {hidden.shape}")
        b, length = hidden.shape[:2]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        if mask_index.shape != (b, length):
            raise ValueError(f"mask_index must be [B, L] = {(b, length)}, got {mask_index.shape}")
        positions, mask = positions_and_mask(b, length, attention_mask)
        if query_cols is not None and (query_cols.ndim != 2 or query_cols.shape[0] != b):
            raise ValueError(f"query_cols must be [B, Q] with B = {b}, got shape {query_cols.shape}")
        return self.planner(hidden, timestep, mask_index, positions, mask, current_block, query=query_cols)


def _check_ids(ids, name: str) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array [B, L], got shape {ids.shape} dtype {ids.dtype}")
    return ids


# ------------------------------------------------------------------------------------ pure entry points
@partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array | None = None):
    """Pure jitted backbone forward: (logits, hidden) = f(graphdef, state, input_ids[, attention_mask])."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


@partial(jax.jit, static_argnums=0)
def planner_forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    hidden: jax.Array,
    timestep: jax.Array,
    mask_index: jax.Array,
    attention_mask: jax.Array | None = None,
):
    """Pure jitted planner head: float32 logits [B, L]."""
    return nnx.merge(graphdef, state).planner_logits(hidden, timestep, mask_index, attention_mask)
