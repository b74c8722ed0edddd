"""Replay a recorded planner rollout and recompute its per-iteration log-probabilities (teacher forcing).

GRPO's loss is built on this: the states are rebuilt from the prompt and the recorded reveals/proposals, so
gradients flow through the model at exactly the states the rollout visited. Lives apart from the decoding
loop because it runs under ``jax.grad`` with the training parameters, not the rollout's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.decoding import planner_step as ps
from dultra_jax.model.dultra import DUltra


def trajectory_logps(
    model: DUltra,
    prompt_ids: jax.Array,
    reveal: jax.Array,
    proposals: jax.Array,
    *,
    block_length: int,
    planner_temperature: float | None = None,
    factor: float = 1.0,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """log-probs [S, B, P+G] of a rollout: log p + log q at revealed positions, log(1 - p) at positions of the
    row's current block still masked after the step, 0 elsewhere and at steps where the row revealed nothing.

    ``prompt_ids`` [B, P]; ``reveal`` bool and ``proposals`` int of shape [S, B, P+G] as recorded by
    ``generate(..., return_trajectory=True)``; ``attention_mask`` [B, P+G] for padding-aware rollouts.
    A row's current block at a step is the block of the positions it revealed then.
    """
    reveal = jnp.asarray(reveal, bool)
    proposals = jnp.asarray(proposals, jnp.int32)
    s, b, length = reveal.shape
    p = prompt_ids.shape[1]
    if prompt_ids.shape[0] != b or proposals.shape != reveal.shape:
        raise ValueError(
            f"shapes disagree: prompt_ids {prompt_ids.shape}, reveal {reveal.shape}, proposals {proposals.shape}"
        )
    g = length - p
    if g <= 0 or g % block_length:
        raise ValueError(f"generation length {g} (= {length} - {p}) must be a positive multiple of {block_length}")
    graphdef, state = nnx.split(model)
    return _replay(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), reveal, proposals, attention_mask,
                   block_length, planner_temperature, float(factor))


def replay_step_logps(
    model: DUltra, x: jax.Array, reveal: jax.Array, proposal: jax.Array, block_length: int, p: int,
    planner_temperature: float | None, factor: float, attention_mask: jax.Array | None,
    hidden: jax.Array | None = None, *, planner_stats: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log-probs [B, L] of one recorded step from state ``x`` (differentiable in the model's parameters).

    The same planner-step math as the decoding loop (:mod:`dultra_jax.decoding.planner_step`), with the head's
    queries restricted to each row's block (exact). ``hidden``: the backbone's states of ``x`` when the caller
    already has them (the planner-only gradient computes them once, outside the head's differentiation).
    ``planner_stats``: also [B, 3] per row = (sum of the reveal probabilities, sum of their binary entropies
    (nats), number of candidates) over the block's candidates, without gradient: what a run logs about the planner.
    """
    mask_id = model.cfg.mask_token_id
    b, length = x.shape
    # block of the revealed positions (rows that revealed nothing get 0s at the end anyway)
    first = jnp.argmax(reveal, axis=-1)
    start = p + ((first - p) // block_length) * block_length
    cols = ps.block_columns(jnp.clip(start, p, length - block_length).astype(jnp.int32), block_length)
    if hidden is None:
        hidden = model.hidden_states(x, attention_mask)
    cand = ps.take_block(x, cols) == mask_id
    logits = model.lm_logits(ps.take_block(hidden, cols)).astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
    row_len = (attention_mask.sum(-1) if attention_mask is not None else jnp.full((b,), length)).astype(jnp.float32)
    timestep, mask_index = ps.step_inputs(x, cols, mask_id, row_len)
    plan = model.planner_logits(hidden, timestep, mask_index, attention_mask, query_cols=cols)
    prob = ps.step_probs(plan, cand, planner_temperature, factor)
    blk_logps = ps.step_logps(prob, cand, ps.take_block(reveal, cols), logits, ps.take_block(proposal, cols))
    out = jnp.zeros((b, length), jnp.float32).at[jnp.arange(b)[:, None], cols].set(blk_logps)
    if not planner_stats:
        return out
    pc = jax.lax.stop_gradient(jnp.clip(prob, 0.0, 1.0))
    entropy = -(jax.scipy.special.xlogy(pc, pc) + jax.scipy.special.xlogy(1 - pc, 1 - pc))
    stats = jnp.stack([jnp.where(cand, pc, 0.0).sum(-1), jnp.where(cand, entropy, 0.0).sum(-1),
                       cand.sum(-1).astype(jnp.float32)], axis=-1)
    return out, stats


def _replay_impl(graphdef, state, prompt_ids, reveal, proposals, attention_mask, block_length, planner_temperature,
                 factor):
    mask_id = nnx.merge(graphdef, state).cfg.mask_token_id
    b, p = prompt_ids.shape
    length = reveal.shape[-1]
    x0 = jnp.concatenate([prompt_ids, jnp.full((b, length - p), mask_id, jnp.int32)], axis=1)

    def step(carry, rec):
        x, params = carry
        rev, prop = rec
        model = nnx.merge(graphdef, params)  # params ride in the carry: NNX needs them at the body's trace level
        logps = replay_step_logps(model, x, rev, prop, block_length, p, planner_temperature, factor, attention_mask)
        return (jnp.where(rev, prop, x), params), logps

    _, out = jax.lax.scan(step, (x0, state), (reveal, proposals))
    return out


_replay = jax.jit(_replay_impl, static_argnums=(0, 6, 7, 8))
