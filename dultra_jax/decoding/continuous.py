"""Continuous batching: decode any number of prompts through a fixed number of rows ("slots").

A slot is refilled with the next prompt as soon as its prompt is finished (all blocks decoded, or end-of-text
with ``early_stop``), so no row idles while prompts remain. The compiled loop runs until some slot is done
(:func:`dultra_jax.decoding.loop._run` with ``until_a_row_is_done``), the host harvests and refills the done
slots and the same compiled loop continues. Rows advance through their blocks independently
(``schedule="per_row"``) and draw their randomness from their own seed (the prompt's index) and iteration
count, so each prompt's result equals ``generate(model, [prompt], row_seeds=[its seed], ...)`` of it alone
(the seed: ``row_seeds[i]``, default the prompt's index).

Prompts are grouped by padded length (geometric widths, small groups merged upwards: :func:`length_buckets`)
so the loop compiles once per bucket.
With a KV cache (``cache="prefix" | "dual"``) refilling mid-block is not possible (the cache is refreshed
for the whole batch at a block's first iteration): prompts then run as sync batches of ``slots`` rows per
bucket, still in input order of results and with the same per-prompt equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.decoding import loop
from dultra_jax.model.dultra import DUltra

_NOT_HERE = ("return_trajectory", "uniforms", "attention_mask", "pad_aware", "plan", "schedule",
             "on_block")


@dataclass
class ManyResult:
    """Results of :func:`generate_many`, in the input order of the prompts."""

    tokens: list[np.ndarray]  # N x [len(prompt) + gen_length] int32: the prompt's ids, then the generated ids
    nfe: np.ndarray  # [N] int32 forwards each prompt was decoding in
    equivalent_forwards: np.ndarray  # [N] float32 its FLOP-weighted forwards (see DecodeResult)
    iterations: int  # batch iterations (loop forwards) in total, over all buckets
    prompt_lengths: np.ndarray  # [N] int32
    widths: np.ndarray  # [N] int32 the padded prompt width each prompt was decoded at (its length bucket)

    def generated(self, i: int) -> np.ndarray:
        """The generated ids of prompt ``i``."""
        return self.tokens[i][int(self.prompt_lengths[i]):]


def bucket_width(n: int) -> int:
    """Padded prompt width for a prompt of n tokens: the next of 16, 24, 32, 48, 64, 96, ... (<= 1.5x n)."""
    w = 16
    while w < n:
        w = w * 3 // 2 if (w & (w - 1)) == 0 else w * 4 // 3
    return w


def length_buckets(lengths, slots: int, limit: int) -> dict[int, list[int]]:
    """{padded width: prompt indices}: geometric widths (:func:`bucket_width`, at most ``limit``), with
    neighbouring widths merged upwards until a bucket holds >= 8 * slots prompts (a smaller last group joins
    the one before), because each bucket ends with a tail of part-empty slots: few large buckets waste less
    than many small ones, padding included."""
    by_width: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_width.setdefault(min(bucket_width(n), max(limit, n)), []).append(i)
    out: dict[int, list[int]] = {}
    pending: list[int] = []
    widths = sorted(by_width)
    for k, w in enumerate(widths):
        pending += by_width[w]
        if len(pending) >= 8 * slots or k == len(widths) - 1:
            if len(pending) < 8 * slots and out:  # a small last group joins the previous one, widened
                pending = out.pop(max(out)) + pending
            out[w], pending = pending, []
    return out


def generate_many(model: DUltra, prompts, *, slots: int, rng: jax.Array | int | None = None,
                  row_seeds=None, **generate_kwargs) -> ManyResult:
    """Decode every prompt of ``prompts`` (a list of 1-D id sequences) through ``slots`` rows.

    ``generate_kwargs`` are :func:`dultra_jax.decoding.generate`'s (``gen_length``, ``block_length``,
    ``strategy``, ``temperature``, ``cache``, ``early_stop``, ...), except the per-batch ones (attention is
    padding-aware). ``row_seeds`` [N] key each prompt's randomness (default: its index), so prompt i's result
    equals ``generate(model, [prompt], row_seeds=[row_seeds[i]], ...)``. Returns a :class:`ManyResult`.
    """
    bad = sorted(set(generate_kwargs) & set(_NOT_HERE))
    if bad:
        raise ValueError(f"generate_many does not take {bad}: it sets padding and scheduling itself")
    if not isinstance(slots, int) or slots <= 0:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    rows = loop.id_rows(prompts)
    if not rows:
        raise ValueError("generate_many got no prompts")
    if any(len(r) == 0 for r in rows):
        raise ValueError("generate_many got an empty prompt: every prompt needs at least one token")
    for name in ("gen_length", "block_length"):
        if name not in generate_kwargs:
            raise ValueError(f"generate_many needs {name}=")
    seeds = list(range(len(rows))) if row_seeds is None else [int(v) for v in np.asarray(row_seeds).reshape(-1)]
    if len(seeds) != len(rows):
        raise ValueError(f"row_seeds has {len(seeds)} seeds for {len(rows)} prompts")
    mcfg = model.cfg
    g = int(generate_kwargs["gen_length"])
    key = jax.random.key(0 if rng is None else rng) if rng is None or isinstance(rng, int) else rng
    sync = generate_kwargs.get("cache", "none") != "none"
    buckets = length_buckets([len(r) for r in rows], slots, mcfg.max_sequence_length - g)
    tokens: list[np.ndarray | None] = [None] * len(rows)
    nfe = np.zeros(len(rows), np.int32)
    eq = np.zeros(len(rows), np.float32)
    widths = np.zeros(len(rows), np.int32)
    iterations = 0
    for width, idx in sorted(buckets.items()):
        widths[idx] = width
        if sync:
            for s in range(0, len(idx), slots):
                part = idx[s:s + slots]
                ids, mask = loop.pad_prompts([rows[i] for i in part], loop.pad_id_of(mcfg), width)
                res = loop.generate(model, ids, rng=key, row_seeds=[seeds[i] for i in part], pad_aware=True,
                                    attention_mask=mask, **generate_kwargs)
                gen = np.asarray(res.generated)
                for j, i in enumerate(part):
                    tokens[i] = np.concatenate([rows[i], gen[j]]).astype(np.int32)
                nfe[part] = np.asarray(res.nfe)
                eq[part] = np.asarray(res.equivalent_forwards)
                iterations += int(res.iterations)
        else:
            iterations += _refill_bucket(model, rows, seeds, idx, width, min(slots, len(idx)), key,
                                         generate_kwargs, tokens, nfe, eq)
    return ManyResult(tokens=tokens, nfe=nfe, equivalent_forwards=eq, iterations=iterations,
                      prompt_lengths=np.asarray([len(r) for r in rows], np.int32), widths=widths)


def _refill_bucket(model, rows, seeds, idx, width, n_slots, key, kwargs, tokens, nfe, eq) -> int:
    """Continuous batching of the prompts ``idx`` (all of padded ``width``) through ``n_slots`` rows."""
    cfg = loop.decode_config(schedule="per_row", **kwargs)
    mcfg = model.cfg
    g, nb = cfg.gen_length, cfg.num_blocks
    length = width + g
    for i in idx:  # the same checks generate makes
        loop.check_prompts(rows[i][None], mcfg, g)
    graphdef, state = nnx.split(model)
    queue = list(idx)
    slot_of: list[int | None] = [None] * n_slots
    first = [queue.pop(0) for _ in range(n_slots)]
    ids, mask = loop.pad_prompts([rows[i] for i in first], loop.pad_id_of(mcfg), width)
    ids = np.concatenate([ids, np.full((n_slots, g), mcfg.mask_token_id, np.int32)], axis=1)
    mask = np.concatenate([mask, np.ones((n_slots, g), np.int32)], axis=1)
    slot_of[:] = first
    st, rws = _start(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), key,
                     jnp.asarray([seeds[i] for i in first], jnp.int32), width, cfg)
    while True:
        st = _segment(graphdef, state, st, rws, width, cfg)
        block, row_nfe = np.asarray(st.block), np.asarray(st.nfe)
        done = [s for s in range(n_slots) if slot_of[s] is not None
                and (block[s] >= nb or row_nfe[s] >= cfg.iteration_cap)]
        if not done:
            break  # every slot empty: the bucket is finished
        x, row_eq = np.asarray(st.x), np.asarray(st.eq)
        for s in done:
            i = slot_of[s]
            tokens[i] = np.concatenate([rows[i], x[s, width:]]).astype(np.int32)
            nfe[i], eq[i] = row_nfe[s], row_eq[s]
            slot_of[s] = queue.pop(0) if queue else None
        st, rws = _refill(st, rws, done, [slot_of[s] for s in done], rows, seeds, width, length, key, cfg, mcfg)
        if all(s is None for s in slot_of):
            break
    return int(st.it)


@partial(jax.jit, static_argnums=(0, 6, 7))
def _start(graphdef, state, ids, mask, key, seeds, width: int, cfg):
    rws = loop._rows(key, seeds, mask, ids.shape[1])
    return loop._initial_state(graphdef, state, ids, rws, width, cfg), rws


@partial(jax.jit, static_argnums=(0, 4, 5))
def _segment(graphdef, state, st, rws, width: int, cfg):
    return loop._run(graphdef, state, st, rws, None, width, cfg, until_a_row_is_done=True)


def _refill(st, rws, slots_, prompt_ids, rows, seeds, width, length, key, cfg, mcfg):
    """Put each prompt of ``prompt_ids`` (None: leave the slot empty) into the matching slot of ``slots_``."""
    x, mask = np.asarray(st.x).copy(), np.asarray(rws.mask).copy()
    block, step, block_n = (np.asarray(a).copy() for a in (st.block, st.step_in_block, st.block_n))
    nfe, eq = np.asarray(st.nfe).copy(), np.asarray(st.eq).copy()
    keys, row_len = rws.keys, np.asarray(rws.length).copy()
    pad = loop.pad_id_of(mcfg)
    for s, i in zip(slots_, prompt_ids, strict=True):
        nfe[s], eq[s], step[s], block_n[s] = 0, 0.0, 0, cfg.block_length
        if i is None:  # empty: nothing masked, already done, attends to itself only
            x[s], mask[s], block[s], row_len[s] = pad, 1, cfg.num_blocks, length
            continue
        r = rows[i]
        x[s] = pad
        x[s, width - len(r):width] = r
        x[s, width:] = mcfg.mask_token_id
        mask[s] = 0
        mask[s, width - len(r):] = 1
        block[s], row_len[s] = 0, len(r) + cfg.gen_length
        keys = keys.at[s].set(jax.random.fold_in(key, seeds[i]))
    st = loop.LoopState(x=jnp.asarray(x), block=jnp.asarray(block), step_in_block=jnp.asarray(step),
                        block_n=jnp.asarray(block_n), nfe=jnp.asarray(nfe), eq=jnp.asarray(eq), it=st.it,
                        traj=None, cache=None)
    return st, loop.Rows(keys=keys, length=jnp.asarray(row_len), mask=jnp.asarray(mask))
