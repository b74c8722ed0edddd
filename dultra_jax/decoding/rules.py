"""Reveal rules: which masked positions of the current block get their proposed token this iteration.

All rules work on one block in block coordinates ([B, bl] arrays) and are pure functions, so the decoding loop
and the GRPO replay share them. ``cand`` marks the positions that may be revealed: MASK tokens of the current
block in rows still decoding. Semantics are the original's (docs/original.md §3), quirks included
unless an option says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def descending_rank(score: jax.Array) -> jax.Array:
    """Rank of each entry along the last axis when sorted by descending score (0 = largest; ties by index)."""
    order = jnp.argsort(-score, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks


def propose_tokens(
    logits: jax.Array, temperature: float, exclude_id: int | None, gumbel_key: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """(proposals [B, bl], float32 logits used) from logits [B, bl, V].

    Greedy at temperature 0; otherwise Gumbel-max: argmax(logits + T * g) with g ~ Gumbel(0, 1) in float32,
    which is the original's argmax(exp(logits) / (-log u)^T) rewritten in log space (the original draws u in
    float64; float32 noise only changes which near-tie wins, not the distribution in any measurable way).
    ``gumbel_key`` is one key per row ([B] keys) so a row's noise does not depend on the rest of the batch.
    """
    logits = logits.astype(jnp.float32)
    if exclude_id is not None:
        logits = logits.at[..., exclude_id].set(NEG_INF)
    if temperature == 0.0 or gumbel_key is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], jnp.float32))(gumbel_key)
    return jnp.argmax(logits + temperature * noise, axis=-1).astype(jnp.int32), logits


def token_confidence(logits: jax.Array, proposals: jax.Array) -> jax.Array:
    """softmax(logits)[proposal] in float32 ([B, bl]); the original uses float64 (ties aside, same order)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, proposals[..., None], axis=-1)[..., 0])


def token_logprob(logits: jax.Array, proposals: jax.Array) -> jax.Array:
    """log softmax(logits)[proposal] at temperature 1, as the original records it for GRPO."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, proposals[..., None], axis=-1)[..., 0]


# ------------------------------------------------------------------------------------------ baselines
def fixed_count(block_n: jax.Array, step_in_block: jax.Array, steps_per_block: int) -> jax.Array:
    """LLaDA's schedule (``get_num_transfer_tokens``): floor(n/steps) + 1[s < n mod steps] tokens at step s.

    Past the last scheduled step (only possible when a MASK proposal was revealed) the last count repeats.
    """
    s = jnp.minimum(step_in_block, steps_per_block - 1)
    return block_n // steps_per_block + (s < block_n % steps_per_block).astype(jnp.int32)


def reveal_fixed(conf: jax.Array, cand: jax.Array, count: jax.Array) -> jax.Array:
    """Top-``count`` [B] highest-confidence candidates."""
    rank = descending_rank(jnp.where(cand, conf, NEG_INF))
    return cand & (rank < count[:, None])


def reveal_threshold(conf: jax.Array, cand: jax.Array, threshold: float) -> jax.Array:
    """Fast-dLLM threshold rule: every candidate with confidence >= threshold, and always the top one."""
    rank = descending_rank(jnp.where(cand, conf, NEG_INF))
    return cand & ((conf >= threshold) | (rank == 0))


def factor_count(sorted_conf: jax.Array, n_cand: jax.Array, factor: float, corrected: bool = False) -> jax.Array:
    """How many of the (descending) sorted candidates the Fast-dLLM factor rule reveals, per row.

    Thresholds: tau_1 = -1, tau_n = 1 - factor / (n + 1); the scan stops at the first candidate below its
    threshold. The original (``get_transfer_index_dynamic``) then reveals the candidates before it, except
    that when the failure is at the *last* candidate (or no candidate fails) it reveals all of them: an
    off-by-one that always reveals the last two together. ``corrected=True`` reveals exactly the prefix
    that passed.
    """
    width = sorted_conf.shape[-1]
    r = jnp.arange(width)
    tau = jnp.where(r == 0, -1.0, 1.0 - factor / (r + 2.0))
    fails = (sorted_conf < tau) & (r < n_cand[:, None])
    any_fail = jnp.any(fails, axis=-1)
    first_fail = jnp.where(any_fail, jnp.argmax(fails, axis=-1), n_cand)
    if corrected:
        return first_fail
    i = jnp.where(any_fail, first_fail, n_cand - 1)
    return jnp.where((i == 0) | (i == n_cand - 1), i + 1, i)


def reveal_factor(conf: jax.Array, cand: jax.Array, factor: float, corrected: bool = False) -> jax.Array:
    masked = jnp.where(cand, conf, NEG_INF)
    sorted_conf = -jnp.sort(-masked, axis=-1)
    count = factor_count(sorted_conf, cand.sum(-1), factor, corrected)
    return cand & (descending_rank(masked) < count[:, None])


# ------------------------------------------------------------------------------------------ planner
def planner_probs(plan_logits: jax.Array, cand: jax.Array, planner_temperature: float | None, factor: float):
    """p = sigmoid(logit [/ tau]) * cand * factor (unclipped, as the original), float32 [B, bl]."""
    z = plan_logits.astype(jnp.float32)
    if planner_temperature is not None:
        z = z / planner_temperature
    return jax.nn.sigmoid(z) * cand * factor


def reveal_planner(p: jax.Array, cand: jax.Array, mode: str, uniforms: jax.Array | None) -> jax.Array:
    """dUltra's decision: Bernoulli(p) per candidate (``bernoulli``, the original's "training" mode) or the
    top floor(sum p) (``topk``, its "inference" mode); then at least one per row that still has candidates:
    the highest-p candidate (the first candidate if all p are 0)."""
    if mode == "bernoulli":
        reveal = cand & (uniforms < p)
    elif mode == "topk":
        k = jnp.minimum(jnp.floor(jnp.sum(p, axis=-1)).astype(jnp.int32), cand.sum(-1))
        reveal = cand & (descending_rank(jnp.where(cand, p, -1.0)) < k[:, None])
    else:
        raise ValueError(f"unknown planner reveal mode {mode!r}; choose 'bernoulli' or 'topk'")
    need = cand.any(-1) & ~reveal.any(-1)
    forced = jax.nn.one_hot(jnp.argmax(jnp.where(cand, p, -1.0), axis=-1), p.shape[-1], dtype=bool)
    return reveal | (need[:, None] & forced)


def planner_step_logps(p: jax.Array, cand: jax.Array, reveal: jax.Array, logq: jax.Array) -> jax.Array:
    """Per-position log-probabilities of one iteration for GRPO: log p + log q where revealed, log(1 - p)
    where a candidate stayed masked, 0 elsewhere and in rows that revealed nothing. p is clipped to [0, 1]
    (the original's p can exceed 1 when factor > 1, which makes its log(1 - p) NaN)."""
    pc = jnp.clip(p, 0.0, 1.0)
    revealed = jnp.where(reveal, jnp.log(pc) + logq, 0.0)
    stayed = jnp.where(cand & ~reveal, jnp.log1p(-pc), 0.0)
    return jnp.where(reveal.any(-1, keepdims=True), revealed + stayed, 0.0)
