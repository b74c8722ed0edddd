"""Reveal rules as objects the decoding loop calls: one per strategy, built once from the config.

Each rule takes the iteration's :class:`BlockStep` (the block's proposals, their logits, the candidates, and
for the planner its head's logits) and returns which candidates are revealed, plus the step's per-position
log-probabilities where a trajectory is recorded. The math is :mod:`dultra_jax.decoding.rules`' (shared with
the GRPO replay); the objects only bind each rule to its settings, so the loop body has no strategy branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from dultra_jax.decoding import planner_step as ps
from dultra_jax.decoding import rules


@dataclass(frozen=True)
class BlockStep:
    """One iteration's inputs to a reveal rule, in block coordinates ([B, bl])."""

    proposals: jax.Array  # [B, bl] int32 proposed tokens
    logits: jax.Array  # [B, bl, V] float32 logits the proposals came from
    cand: jax.Array  # [B, bl] bool MASKs of the current block in rows decoding this iteration
    plan: jax.Array | None  # [B, bl] planner head logits (planner only)
    keys: jax.Array  # [B] the rows' keys for this iteration (their key folded with their NFE)
    cols: jax.Array  # [B, bl] canvas columns of the block
    it: jax.Array  # [] batch iteration (indexes recorded uniforms)
    block_n: jax.Array  # [B] MASKs in the row's block when it began
    step_in_block: jax.Array  # [B] iterations since the row's block began


@dataclass(frozen=True)
class Planner:
    """dUltra's head: reveal each candidate with its sigmoid probability (Bernoulli draws per row and NFE, or
    recorded ``uniforms`` [S, B, L] when replaying), or the top-k by it."""

    reveal: str
    planner_temperature: float | None
    factor: float
    prompt_width: int
    gen_length: int
    uniforms: jax.Array | None = None
    record: bool = False

    def __call__(self, s: BlockStep) -> tuple[jax.Array, jax.Array | None]:
        prob = ps.step_probs(s.plan, s.cand, self.planner_temperature, self.factor)
        if self.uniforms is not None:
            u = ps.take_block(self.uniforms[jnp.minimum(s.it, self.uniforms.shape[0] - 1)], s.cols)
        else:
            u_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(s.keys)
            u_gen = jax.vmap(lambda k: jax.random.uniform(k, (self.gen_length,), jnp.float32))(u_keys)
            u = ps.take_block(u_gen, s.cols - self.prompt_width)
        reveal = rules.reveal_planner(prob, s.cand, self.reveal, u)
        logps = ps.step_logps(prob, s.cand, reveal, s.logits, s.proposals) if self.record else None
        return reveal, logps


@dataclass(frozen=True)
class Threshold:
    """Fast-dLLM's rule: reveal candidates with confidence >= ``threshold``, and always the most confident."""

    threshold: float

    def __call__(self, s: BlockStep) -> tuple[jax.Array, None]:
        return rules.reveal_threshold(rules.token_confidence(s.logits, s.proposals), s.cand, self.threshold), None


@dataclass(frozen=True)
class Factor:
    """Fast-dLLM's factor rule: reveal the most confident candidates while each passes its rank's threshold
    (``corrected``: without the original's off-by-one; see :func:`rules.factor_count`)."""

    factor: float
    corrected: bool

    def __call__(self, s: BlockStep) -> tuple[jax.Array, None]:
        conf = rules.token_confidence(s.logits, s.proposals)
        return rules.reveal_factor(conf, s.cand, self.factor, self.corrected), None


@dataclass(frozen=True)
class Fixed:
    """LLaDA's schedule: a fixed number of the most confident candidates per step of the block."""

    steps_per_block: int

    def __call__(self, s: BlockStep) -> tuple[jax.Array, None]:
        count = rules.fixed_count(s.block_n, s.step_in_block, self.steps_per_block)
        return rules.reveal_fixed(rules.token_confidence(s.logits, s.proposals), s.cand, count), None


def rule_of(cfg, prompt_width: int, uniforms: jax.Array | None = None):
    """The reveal rule object of a :class:`dultra_jax.decoding.loop.DecodeConfig`."""
    if cfg.strategy == "planner":
        return Planner(reveal=cfg.reveal, planner_temperature=cfg.planner_temperature, factor=cfg.factor,
                       prompt_width=prompt_width, gen_length=cfg.gen_length, uniforms=uniforms,
                       record=cfg.return_trajectory)
    if cfg.strategy == "threshold":
        return Threshold(cfg.threshold)
    if cfg.strategy == "factor":
        return Factor(cfg.factor, cfg.factor_rule == "corrected")
    return Fixed(cfg.steps_per_block)
