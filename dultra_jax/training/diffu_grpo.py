"""d1's diffu-GRPO as pure functions: the one-step per-token log-probability estimate and its clipped loss.

A completion's log-likelihood under a masked diffusion LM has no closed form; d1 estimates it with one forward
pass: every completion token MASKed, each prompt token MASKed with probability ``p_mask_prompt`` (a fresh draw
per optimiser update, the same draw for the update's old/reference estimates), and log p(token) read from the
logits at temperature 1. The loss is TRL's per-token clipped PPO objective with an optional k3 KL to a
reference, averaged over the completion tokens of the batch (docs/diffu-grpo.md). Unlike the replay objective
(:mod:`dultra_jax.training.grpo`) it never looks at the decoding trajectory, so any reveal rule can roll out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.training.grpo import GRPOLossConfig


@jax.tree_util.register_dataclass
@dataclass
class DiffuBatch:
    """One optimiser update's input: the rollout's sequences, this update's prompt noise and its estimates."""

    input_ids: jax.Array  # [B, P+G] prompt (left-padded) + generated tokens
    prompt_noise: jax.Array  # [B, P] bool: prompt tokens MASKed for this update's estimate
    completion_mask: jax.Array  # [B, G] float: 1 up to and including the first end-of-sequence token
    advantages: jax.Array  # [B]
    attention_mask: jax.Array | None = None  # [B, P+G] 0 on the prompt's left padding
    old_logps: jax.Array | None = None  # [B, G] estimate of the rollout policy (None: on-policy, mu = 1)
    ref_logps: jax.Array | None = None  # [B, G] estimate of the reference policy (beta > 0)


def noised_inputs(input_ids: jax.Array, prompt_noise: jax.Array, mask_id: int) -> jax.Array:
    """The estimator's input [B, P+G]: the whole completion MASKed, and the prompt tokens ``prompt_noise`` marks."""
    p = prompt_noise.shape[1]
    completion = jnp.ones((input_ids.shape[0], input_ids.shape[1] - p), bool)
    return jnp.where(jnp.concatenate([prompt_noise, completion], axis=1), mask_id, input_ids)


def completion_logps(model, input_ids: jax.Array, prompt_noise: jax.Array,
                     attention_mask: jax.Array | None = None) -> jax.Array:
    """d1's one-step estimate [B, G] of log p(completion token) for every completion position (float32).

    One forward pass on :func:`noised_inputs`; the LM head runs on the completion positions only; the
    log-softmax is over the whole vocabulary at temperature 1 (MASK included, as d1).
    """
    p = prompt_noise.shape[1]
    x = noised_inputs(input_ids, prompt_noise, model.cfg.mask_token_id)
    hidden = model.hidden_states(x, attention_mask)[:, p:]
    logp = jax.nn.log_softmax(model.lm_logits(hidden).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, p:, None].astype(jnp.int32), axis=-1)[..., 0]


def diffu_grpo_loss(graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], batch: DiffuBatch,
                    cfg: GRPOLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = sum over completion tokens of [-min(r A, clip(r) A) + beta KL] / number of completion tokens.

    r = exp(l_new - l_old) per token (l_old = stop_gradient(l_new) when the batch has no old estimate, d1's
    mu = 1 case: r = 1, gradient A grad l_new); clip bounds are 1 - epsilon_low, 1 + epsilon_high; ``delta``
    caps the unclipped ratio and ``advantage_min_clip`` zeroes advantages below it, as the replay objective.
    """
    model = nnx.merge(graphdef, *states)
    new = completion_logps(model, batch.input_ids, batch.prompt_noise, batch.attention_mask)
    old = jax.lax.stop_gradient(new) if batch.old_logps is None else batch.old_logps
    mask = batch.completion_mask.astype(jnp.float32)
    adv = batch.advantages[:, None]
    if cfg.advantage_min_clip is not None:
        adv = jnp.where(adv < cfg.advantage_min_clip, 0.0, adv)
    ratio = jnp.exp(new - old)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    unclipped = jnp.minimum(ratio, cfg.delta) if cfg.delta is not None else ratio
    per_token = -jnp.minimum(unclipped * adv, clipped_ratio * adv)
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {"clip_fraction": jnp.sum(((clipped_ratio * adv) < (unclipped * adv)) * mask) / tokens,
               "max_abs_log_ratio": jnp.max(jnp.abs(new - old) * mask)}
    if cfg.beta > 0:
        if batch.ref_logps is None:
            raise ValueError("beta > 0 needs the batch's ref_logps")
        d = batch.ref_logps - new
        kl = jnp.exp(d) - d - 1.0
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = jnp.sum(kl * mask) / tokens
    return jnp.sum(per_token * mask) / tokens, metrics


def make_loss(cfg: GRPOLossConfig, trainable: str = "all"):
    """diffu-GRPO in :func:`dultra_jax.training.step.make_train_step`'s ``(graphdef, states, batch, rng)`` form
    (one forward per update whatever trains: ``trainable`` changes nothing)."""

    def loss(graphdef: nnx.GraphDef, states: tuple, batch: DiffuBatch, rng: jax.Array):
        return diffu_grpo_loss(graphdef, states, batch, cfg)

    return loss


# ------------------------------------------------------------------------------------------- host side
def completion_mask(generated: np.ndarray, eos_ids: tuple[int, ...]) -> np.ndarray:
    """[B, G] float32: 1 up to and including the first end-of-sequence token of each row (all 1 without one)."""
    generated = np.asarray(generated)
    is_eos = np.isin(generated, np.asarray(eos_ids))
    first = np.where(is_eos.any(-1), is_eos.argmax(-1), generated.shape[1])
    return (np.arange(generated.shape[1])[None, :] <= first[:, None]).astype(np.float32)


def prompt_noise(seed: tuple[int, ...], rows: int, prompt_length: int, p_mask_prompt: float) -> np.ndarray:
    """[rows, P] bool: each prompt token MASKed with probability ``p_mask_prompt``, drawn from ``seed`` (the
    same on every process; each takes its own rows), so a resumed run redraws the same noise."""
    return np.random.default_rng(list(seed)).random((rows, prompt_length)) < p_mask_prompt


@partial(jax.jit, static_argnums=0)
def micro_batch_logps(graphdef: nnx.GraphDef, state: nnx.State, batch: DiffuBatch) -> jax.Array:
    """:func:`completion_logps` of every micro-batch stacked on the leading axis -> [n, B/n, G] (no gradient):
    the rollout policy's old estimate and the reference's, computed where the micro-batches were placed."""
    model = nnx.merge(graphdef, state)
    return jax.lax.map(lambda mb: completion_logps(model, mb.input_ids, mb.prompt_noise, mb.attention_mask),
                       batch)
