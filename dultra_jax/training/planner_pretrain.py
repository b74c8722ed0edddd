"""Planner pre-training: teach the head to imitate Fast-dLLM's factor rule on the frozen backbone's logits.

The original's collator (docs/original.md §5) masks a random span ("block", >= 32 tokens or what fits)
with ratio t and everything after it; the head sees the frozen backbone's final hidden states, the timestep
1 - #MASK/N and the block's masked positions, and is trained with BCE (pos_weight = #neg/#pos) towards the
factor rule's reveal decisions (factor 1, greedy, MASK logit kept, the original's off-by-one included).
The backbone is frozen by construction: its forward is under ``stop_gradient`` and only the head's
parameters are given to the optimiser (see ``dultra_jax.training.step``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.decoding import rules


def noise_batch(
    ids: np.ndarray, prompt_lengths: np.ndarray, mask_id: int, rng: np.random.Generator, min_block: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """The original's noising collator on host: (noisy ids [B, N], block_index [B, N] bool)."""
    ids = np.array(ids, copy=True)
    b, n = ids.shape
    block_index = np.zeros((b, n), bool)
    for i in range(b):
        p = int(prompt_lengths[i])
        if n - p <= 2:
            continue
        t = rng.uniform()
        b0, b1 = sorted(rng.choice(np.arange(p, n - 1), size=2, replace=False).tolist())
        b0 = min(b0, n - min_block)
        b1 = max(b1, b0 + min_block)
        b0 = max(b0, 0)
        b1 = min(b1, n)
        count = max(1, math.ceil((b1 - b0) * t))
        chosen = rng.choice(np.arange(b0, b1), size=min(count, b1 - b0), replace=False)
        ids[i, chosen] = mask_id
        ids[i, b1:] = mask_id
        block_index[i, chosen] = True
    return ids, block_index


def factor_targets(logits: jax.Array, block_index: jax.Array, factor: float = 1.0) -> jax.Array:
    """The factor rule's decisions (float 0/1 [B, N]) among the block's masked positions, greedy tokens."""
    logits = logits.astype(jnp.float32)
    x0 = jnp.argmax(logits, axis=-1)
    conf = rules.token_confidence(logits, x0)
    return rules.reveal_factor(conf, block_index, factor).astype(jnp.float32)


def weighted_bce(z: jax.Array, y: jax.Array, where: jax.Array) -> jax.Array:
    """Mean BCE-with-logits over ``where``; pos_weight = #neg/#pos when both classes occur, 0 if empty."""
    w = where.astype(jnp.float32)
    n_pos = jnp.sum(y * w)
    n_neg = jnp.sum((1 - y) * w)
    pos_weight = jnp.where((n_pos > 0) & (n_neg > 0), n_neg / jnp.maximum(n_pos, 1.0), 1.0)
    per = -(pos_weight * y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z))
    return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def planner_loss(
    graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], batch: dict[str, jax.Array], rng: jax.Array,
    factor: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``batch``: ``input_ids`` [B, N] (already noised), ``block_index`` [B, N] and optionally
    ``attention_mask`` [B, N] (0 on left padding: not attended to, and not counted in the timestep)."""
    del rng
    model = nnx.merge(graphdef, *states)
    ids = batch["input_ids"].astype(jnp.int32)
    block_index = batch["block_index"].astype(bool)
    mask = batch.get("attention_mask")
    logits, hidden = model(ids, mask)
    logits, hidden = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(hidden)
    targets = factor_targets(logits, block_index, factor)
    tokens = ids.shape[1] if mask is None else jnp.maximum(mask.sum(-1), 1)
    timestep = 1.0 - (ids == model.cfg.mask_token_id).sum(-1) / tokens
    z = model.planner_logits(hidden, timestep, block_index, mask)
    loss = weighted_bce(z, targets, block_index)
    pred = (z > 0).astype(jnp.float32)
    n = jnp.maximum(block_index.sum(), 1)
    return loss, {
        "target_positive_rate": jnp.sum(targets * block_index) / n,
        "decision_accuracy": jnp.sum((pred == targets) & block_index) / n,
    }
