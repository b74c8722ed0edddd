"""Masked-diffusion SFT (LLaDA's objective): learn to fill masked answer tokens at every noise level.

Per sequence a mask ratio t ~ U(eps, 1); each answer token is masked with probability t (the prompt never);
cross-entropy on the masked tokens, weighted 1/t (the ELBO weighting), summed and divided by the answer length,
averaged over the batch. Optional label smoothing keeps the model's confidences below 1, as those of large
dLLMs are (the CPU demo uses it so confidence-based decoding is conservative, as on real models).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sft_loss(
    graphdef: nnx.GraphDef, states: tuple[nnx.State, ...], batch: dict[str, jax.Array], rng: jax.Array,
    eps: float = 1e-3, label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``batch``: ``input_ids`` [B, L] (prompt + answer + end-of-text padding), ``answer_mask`` [B, L] (1 on
    the answer part, which includes the trailing end-of-text tokens the model must learn to emit) and optionally
    ``attention_mask`` [B, L] (0 on the prompt's left padding, which no position attends to) and ``row_seed``
    [B] (each row's noise then comes from ``fold_in(rng, row_seed)``, so it does not depend on which
    micro-batch or process the row lands in; the trainer passes step * batch + global row index)."""
    model = nnx.merge(graphdef, *states)
    ids = batch["input_ids"].astype(jnp.int32)
    answer = batch["answer_mask"].astype(bool)
    b = ids.shape[0]
    if "row_seed" in batch:
        keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(batch["row_seed"].astype(jnp.uint32))
        t = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), minval=eps, maxval=1.0))(keys)
        t = t[:, None]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), ids.shape[1:]))(keys)
    else:
        k_t, k_m = jax.random.split(rng)
        t = jax.random.uniform(k_t, (b, 1), minval=eps, maxval=1.0)
        u = jax.random.uniform(k_m, ids.shape)
    masked = answer & (u < t)
    noisy = jnp.where(masked, model.cfg.mask_token_id, ids)
    logits, _ = model(noisy, batch.get("attention_mask"))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    answer_len = jnp.maximum(answer.sum(-1, keepdims=True), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(masked, nll / t / answer_len, 0.0)) / b
    n_masked = jnp.maximum(masked.sum(), 1)
    acc = jnp.sum(masked & (jnp.argmax(logits, -1) == ids)) / n_masked
    return loss, {"masked_token_accuracy": acc, "masked_tokens": masked.sum().astype(jnp.float32)}
