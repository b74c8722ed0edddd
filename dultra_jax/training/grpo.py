"""GRPO for dUltra as pure functions: group advantages and the replayed, clipped trajectory objective.

The policy of a rollout is the whole decoding trajectory: at every recorded iteration, which masked positions
of the block were revealed (planner Bernoulli decisions) and which tokens they got (backbone). The loss replays
each iteration from its recorded state (teacher forcing, :func:`dultra_jax.decoding.trajectory.replay_step_logps`),
forms one *sequence-level* ratio per row and iteration (the sum of per-position log-ratios, as the original),
clips it PPO-style and sums over iterations (docs/original.md §6). The replay is a ``lax.scan``
over the parameters as constants whose body is rematerialised, so its memory does not grow with the number of
recorded iterations S, and an iteration where no row revealed anything is skipped (``lax.cond``). A rollout
records up to its cap (G) iterations but needs far fewer: :func:`trim_rollout` cuts S on the host to the
rollout's ``num_steps`` rounded up to one of :func:`recorded_step_buckets` (one compile per bucket).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.decoding.trajectory import replay_step_logps


@dataclass(frozen=True)
class GRPOLossConfig:
    """The original's loss options (defaults: its `grpo_exp.sh` settings where they are well-defined)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 1.0
    delta: float | None = None
    advantage_min_clip: float | None = 0.1
    beta: float = 0.0
    block_length: int = 32
    max_completion_length: int = 256
    planner_temperature: float | None = None
    factor: float = 1.0


def group_advantages(
    rewards: jax.Array, group_size: int, scale: Literal["none", "group", "batch"] = "none"
) -> jax.Array:
    """A = r - mean over each group of ``group_size`` consecutive rows; optionally / (std + 1e-4) with the
    unbiased (n-1) std of the group or of the whole batch. NaN rewards (failed reward functions) count as 0,
    like the original's nansum."""
    r = jnp.nan_to_num(jnp.asarray(rewards, jnp.float32))
    if r.shape[0] % group_size:
        raise ValueError(f"batch of {r.shape[0]} rewards is not a whole number of groups of {group_size}")
    g = r.reshape(-1, group_size)
    adv = (g - g.mean(-1, keepdims=True)).reshape(-1)
    if scale == "group":
        std = jnp.repeat(jnp.std(g, axis=-1, ddof=1), group_size)
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        adv = adv / (jnp.std(r, ddof=1) + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}; choose none, group or batch")
    return adv


def clipped_objective(
    log_ratio: jax.Array, advantages: jax.Array, cfg: GRPOLossConfig
) -> tuple[jax.Array, jax.Array]:
    """Per-row loss -min(rho A, clip(rho) A) for one iteration's sequence log-ratios [B]; and clip flags."""
    adv = advantages
    if cfg.advantage_min_clip is not None:
        adv = jnp.where(adv < cfg.advantage_min_clip, 0.0, adv)
    rho = jnp.exp(log_ratio)
    rho_clipped = jnp.clip(rho, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    rho_unclipped = jnp.minimum(rho, cfg.delta) if cfg.delta is not None else rho
    loss = -jnp.minimum(rho_unclipped * adv, rho_clipped * adv)
    clipped = (rho_clipped * adv) < (rho_unclipped * adv)
    return loss, clipped


def k3_kl(new_logps: jax.Array, ref_logps: jax.Array, where: jax.Array) -> jax.Array:
    """Per-row k3 estimator sum_i exp(ref - new) - (ref - new) - 1 over the positions in ``where``."""
    d = jnp.where(where, ref_logps - new_logps, 0.0)
    return jnp.sum(jnp.where(where, jnp.exp(d) - d - 1.0, 0.0), axis=-1)


@jax.tree_util.register_dataclass
@dataclass
class Rollout:
    """What the loss needs from a rollout; [S, B, L] arrays as ``generate(..., return_trajectory=True)`` records."""

    prompt_ids: jax.Array  # [B, P]
    reveal: jax.Array  # [S, B, L] bool
    proposals: jax.Array  # [S, B, L] int
    old_logps: jax.Array  # [S, B, L] float32
    advantages: jax.Array  # [B]
    attention_mask: jax.Array | None = None  # [B, L] for padding-aware rollouts
    ref_logps: jax.Array | None = None  # [S, B, L], needed when beta > 0


def _skip(x, rec) -> jax.Array:
    return jnp.zeros((7,), jnp.float32)


def _step_stats(model, x, rec, rollout: Rollout, cfg: GRPOLossConfig, hidden: jax.Array | None = None) -> jax.Array:
    """One recorded iteration from state ``x``: [sum over rows of the row loss, clipped rows, active rows,
    max |log ratio|, planner reveal-probability sum, entropy sum, candidates]; ``hidden`` = the backbone's
    states of ``x`` when the caller has them."""
    reveal, proposal, old, ref = rec
    p, length = rollout.prompt_ids.shape[1], x.shape[1]
    completion = jnp.arange(length) >= p
    new, planner = replay_step_logps(model, x, reveal, proposal, cfg.block_length, p, cfg.planner_temperature,
                                     cfg.factor, rollout.attention_mask, hidden, planner_stats=True)
    active = reveal.any(-1)
    log_ratio = jnp.sum(jnp.where(completion, new - old, 0.0), axis=-1)
    row_loss, clipped = clipped_objective(log_ratio, rollout.advantages, cfg)
    if cfg.beta > 0:
        row_loss = row_loss + cfg.beta * k3_kl(new, ref, completion[None, :] & (new != 0))
    row_loss = jnp.where(active, row_loss, 0.0)
    return jnp.stack([
        jnp.sum(row_loss), jnp.sum(jnp.where(active, clipped, False)), jnp.sum(active),
        jnp.max(jnp.where(active, jnp.abs(log_ratio), 0.0)),
        *jnp.where(active[:, None], planner, 0.0).sum(0),  # reveal prob / entropy sums, candidates
    ])


def _start(rollout: Rollout, mask_id: int):
    """(the canvas before the first iteration [B, L], the scanned records)."""
    p = rollout.prompt_ids.shape[1]
    _, b, length = rollout.reveal.shape
    x0 = jnp.concatenate(
        [rollout.prompt_ids.astype(jnp.int32), jnp.full((b, length - p), mask_id, jnp.int32)], axis=1
    )
    ref = rollout.ref_logps if rollout.ref_logps is not None else jnp.zeros_like(rollout.old_logps)
    return x0, (rollout.reveal, rollout.proposals, rollout.old_logps, ref)


def _summarise(stats: jax.Array, rows: int, cfg: GRPOLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss = stats[:, 0].sum() / rows / cfg.max_completion_length
    n_active = jnp.maximum(stats[:, 2].sum(), 1.0)
    metrics = {
        "clip_fraction": stats[:, 1].sum() / n_active,
        "max_abs_log_ratio": stats[:, 3].max(),
        "replayed_steps": jnp.sum(stats[:, 2] > 0).astype(jnp.float32),
        # the planner over the candidates of the replayed iterations (current weights): mean reveal
        # probability and mean binary entropy (nats); mean-over-micro-batches in the logged row
        "planner_reveal_prob": stats[:, 4].sum() / jnp.maximum(stats[:, 6].sum(), 1.0),
        "planner_entropy": stats[:, 5].sum() / jnp.maximum(stats[:, 6].sum(), 1.0),
    }
    return loss, metrics


def grpo_loss(
    graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], rollout: Rollout, cfg: GRPOLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The replayed trajectory objective of the model ``nnx.merge(graphdef, *states)``; returns (loss, metrics).

    loss = sum over iterations s of mean over rows b of [-min(rho A, clip(rho) A) + beta KL] / L, where
    rho_{b,s} = exp(sum_i (l_new - l_old)) over the completion and L = max_completion_length. Rows that
    revealed nothing at s contribute nothing (in the original they add a constant). The original divides by
    half the batch (its two replay chunks) and by the gradient-accumulation steps twice; the optimiser's
    update direction is the same up to that constant scale, which the learning rate absorbs.
    """
    x0, recs = _start(rollout, nnx.merge(graphdef, *states).cfg.mask_token_id)

    def one_step(x, rec):
        model = nnx.merge(graphdef, *states)  # closed over: scan constants, never per-iteration residuals
        return _step_stats(model, x, rec, rollout, cfg)

    # Memory independent of S (benchmarks/replay_memory.py): the parameters are closed over (scan constants,
    # not carry, which the scan would save once per iteration), and the skip of an iteration where no row
    # revealed anything is a cond *inside* a checkpoint that saves nothing but its inputs (x and the
    # iteration's records). A cond *around* the checkpoint returns the checkpoint's residuals, the
    # parameters among them, as per-iteration outputs that the scan stacks S times. The branch keeps its own
    # checkpoint: linearising the cond over the bare step gave NaN gradients (the finite-difference test in
    # tests/test_training.py), and with it the branch's only residuals are its inputs. The nesting costs no
    # extra FLOPs: the outer recomputation's forward is dead code that XLA removes (docs/diffu-grpo.md).
    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    def replay_one(x, rec):
        return jax.lax.cond(rec[0].any(), jax.checkpoint(one_step), _skip, x, rec)

    def body(x, rec):
        reveal, proposal = rec[0], rec[1]
        return jnp.where(reveal, proposal, x), replay_one(x, rec)

    _, stats = jax.lax.scan(body, x0, recs)
    return _summarise(stats, rollout.reveal.shape[1], cfg)


def _planner_scan(graphdef, planner, frozen, rollout: Rollout, cfg: GRPOLossConfig, with_grads: bool):
    """Forward scan of the replay for a planner-only update: per-iteration stats [S, 7] and (``with_grads``)
    the gradient w.r.t. the planner of the sum over iterations of each iteration's row-loss sum. The backbone
    runs once per iteration, outside the head's differentiation: its states do not depend on the planner."""
    x0, recs = _start(rollout, nnx.merge(graphdef, planner, frozen).cfg.mask_token_id)
    zeros = jax.tree.map(jnp.zeros_like, planner)

    def terms(pl, hidden, x, rec):
        stats = _step_stats(nnx.merge(graphdef, pl, frozen), x, rec, rollout, cfg, hidden)
        return stats[0], stats

    def active(x, rec):
        hidden = nnx.merge(graphdef, planner, frozen).hidden_states(x, rollout.attention_mask)
        if not with_grads:
            return terms(planner, hidden, x, rec)[1], zeros
        (_, stats), grads = jax.value_and_grad(terms, has_aux=True)(planner, hidden, x, rec)
        return stats, grads

    def body(carry, rec):
        x, acc = carry
        stats, grads = jax.lax.cond(rec[0].any(), active, lambda x, rec: (_skip(x, rec), zeros), x, rec)
        return (jnp.where(rec[0], rec[1], x), jax.tree.map(jnp.add, acc, grads)), stats

    (_, grads), stats = jax.lax.scan(body, (x0, zeros), recs)
    return stats, grads


def planner_grpo_loss(
    graphdef: nnx.GraphDef, states: tuple[nnx.State, nnx.State], rollout: Rollout, cfg: GRPOLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`grpo_loss` for ``states = (planner parameters, the rest)``, differentiable in the planner only.

    The loss is a sum of per-iteration terms and, with the backbone frozen, each term's gradient needs only
    that iteration's backbone states: the gradient is accumulated in the forward scan (a VJP of the head per
    iteration) and the backward pass just scales it, so the backbone runs once per iteration instead of
    three times (forward, rematerialised forward, backward through the replay's checkpoint).
    """
    planner, frozen = states
    rows = rollout.reveal.shape[1]

    @jax.custom_vjp
    def loss(pl, fr, ro):
        return _summarise(_planner_scan(graphdef, pl, fr, ro, cfg, with_grads=False)[0], rows, cfg)

    def fwd(pl, fr, ro):
        stats, grads = _planner_scan(graphdef, pl, fr, ro, cfg, with_grads=True)
        return _summarise(stats, rows, cfg), grads

    def bwd(grads, cotangents):
        scale = cotangents[0] / rows / cfg.max_completion_length
        return jax.tree.map(lambda g: g * scale, grads), None, None

    loss.defvjp(fwd, bwd)
    return loss(planner, frozen, rollout)


def make_loss(cfg: GRPOLossConfig, trainable: str = "all"):
    """The GRPO loss in :func:`dultra_jax.training.step.make_train_step`'s ``(graphdef, states, batch, rng)``
    form (the trainer's step and the memory plan's compile of it); ``trainable="planner"`` (states = (planner,
    rest)) takes :func:`planner_grpo_loss`, the same value and gradient at a third of the backbone's cost."""
    fn = planner_grpo_loss if trainable == "planner" else grpo_loss

    def loss(graphdef: nnx.GraphDef, states: tuple, batch: Rollout, rng: jax.Array):
        return fn(graphdef, states, batch, cfg)

    return loss


# ------------------------------------------------------------------------------------------- trimming S
MIN_BUCKET = 8


def recorded_step_buckets(cap: int) -> tuple[int, ...]:
    """The recorded-iteration counts the replay is compiled for: powers of two from 8 below ``cap``, and ``cap``.

    A rollout records up to ``cap`` iterations (its generation length) but the planner needs far fewer; the
    trainer replays ``bucket_for(num_steps, cap)`` of them, so a run compiles at most log2(cap / 8) + 1
    programs and replays at most twice the iterations it needs.
    """
    if cap < 1:
        raise ValueError(f"the recorded-step cap must be >= 1, got {cap}")
    buckets, b = [], MIN_BUCKET
    while b < cap:
        buckets.append(b)
        b *= 2
    return (*buckets, cap)


def bucket_for(num_steps: int, cap: int) -> int:
    """The smallest bucket of :func:`recorded_step_buckets` (``cap``) holding ``num_steps`` iterations."""
    if not 0 <= num_steps <= cap:
        raise ValueError(f"num_steps {num_steps} is outside [0, {cap}] (the rollout's recorded-step cap)")
    return next(b for b in recorded_step_buckets(cap) if b >= num_steps)


def trim_rollout(rollout: Rollout, s: int, *, axis: int = 0, check: bool = True) -> Rollout:
    """The first ``s`` recorded iterations of ``rollout`` (its [S, ...] arrays sliced on ``axis``: 0 for one
    rollout, 1 for micro-batches stacked in front). The loss and its gradient are unchanged when no
    iteration past ``s`` revealed anything, which ``check`` verifies (one scalar read from the device)."""
    steps = rollout.reveal.shape[axis]
    if not 1 <= s <= steps:
        raise ValueError(f"cannot trim a rollout of {steps} recorded iterations to {s}")
    if s == steps:
        return rollout

    def part(a, start, stop):
        return a[(slice(None),) * axis + (slice(start, stop),)]  # numpy stays numpy (host-side trimming)

    if check and bool(part(rollout.reveal, s, steps).any()):
        raise ValueError(f"trimming to {s} recorded iterations drops iterations that revealed tokens; "
                         f"use bucket_for(num_steps, cap) with the rollout's num_steps")

    def cut(a):
        return None if a is None else part(a, 0, s)

    return replace(rollout, reveal=cut(rollout.reveal), proposals=cut(rollout.proposals),
                   old_logps=cut(rollout.old_logps), ref_logps=cut(rollout.ref_logps))
