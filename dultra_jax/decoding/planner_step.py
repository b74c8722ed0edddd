"""One planner iteration's math, shared by the decoding loop and the GRPO replay (so they cannot drift).

The planner is conditioned on the canvas' timestep (fraction of non-MASK tokens among the row's real tokens)
and on which positions are MASKs of the row's current block; its sigmoid gives each candidate a reveal
probability, and a step's log-probability is log p + log q at revealed positions and log(1 - p) at candidates
that stayed masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dultra_jax.decoding import rules
from dultra_jax.model.layers import take_positions


def block_columns(start: jax.Array, block_length: int) -> jax.Array:
    """Canvas columns [B, bl] of each row's current block from its first column ``start`` [B]."""
    return start[:, None] + jnp.arange(block_length, dtype=jnp.int32)


def step_inputs(x: jax.Array, cols: jax.Array, mask_id: int, row_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(timestep [B] float32, mask_index [B, L] bool) for canvas ``x`` [B, L] and block columns ``cols``."""
    masked = x == mask_id
    timestep = 1.0 - masked.sum(-1).astype(jnp.float32) / row_len
    col = jnp.arange(x.shape[1])
    in_block = (col >= cols[:, :1]) & (col <= cols[:, -1:])
    return timestep, masked & in_block


def step_probs(plan_blk: jax.Array, cand: jax.Array, planner_temperature: float | None, factor: float) -> jax.Array:
    """Reveal probabilities [B, bl] of the block's candidates from the head's block logits."""
    return rules.planner_probs(plan_blk, cand, planner_temperature, factor)


def step_logps(prob: jax.Array, cand: jax.Array, reveal: jax.Array, logits_blk: jax.Array,
               proposals_blk: jax.Array) -> jax.Array:
    """Per-position log-probabilities [B, bl] of one step (see :func:`rules.planner_step_logps`)."""
    return rules.planner_step_logps(prob, cand, reveal, rules.token_logprob(logits_blk, proposals_blk))


def take_block(a: jax.Array, cols: jax.Array) -> jax.Array:
    """a [B, L, ...] at each row's block columns -> [B, bl, ...]."""
    return take_positions(a, cols)
