"""Log-likelihood of a continuation under a masked diffusion model: LLaDA's Monte Carlo estimate (docs/lm-eval.md).

A masked diffusion LM has no left-to-right factorisation, so ``log p(continuation | context)`` is estimated by its
evidence lower bound: mask ``l`` of the ``L`` continuation tokens (never the context), score the masked tokens,
weight each token's ``-log p`` by ``L / l`` (the discrete ``1/t``), sum per sample and average over samples::

    log p(y | x) >= E_l E_mask [ -(L / l) * sum_{j masked} -log p(y_j | x, y_masked) ]

The number ``l`` of masked tokens is stratified over a request's ``mc_num`` samples (one random offset, evenly
spaced values wrapped into 1..L), the positions are uniform among the continuation's. The masks are drawn on the
host from a generator keyed by the seed and the request's own ids, so a request's estimate does not depend on
the batch size or on which other requests are scored with it. The forward runs jitted on fixed padded shapes:
rows of several requests share a batch of ``mc_batch`` rows, left-padded to a bucketed width, the LM head applied
to the bucketed continuation columns only.

``greedy``: LLaDA's check of whether the continuation is what the model decodes from ``[context | MASK x L]``
unmasking the single most confident position per step (``L`` forwards, one row per request).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.config import ConfigError
from dultra_jax.decoding.continuous import bucket_width
from dultra_jax.decoding.loop import pad_id_of


@dataclass(frozen=True)
class LikelihoodSettings:
    """``mc_num`` samples per request, ``mc_batch`` rows per forward, ``cfg`` LLaDA's classifier-free guidance
    scale (0: off; > 0 adds a forward with the context masked), ``seed`` of the masks, ``greedy`` whether to
    compute the is-greedy flag (False: reported as False, skipping its L forwards per request)."""

    mc_num: int = 128
    mc_batch: int = 32
    cfg: float = 0.0
    seed: int = 0
    greedy: bool = True

    def __post_init__(self) -> None:
        for name in ("mc_num", "mc_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not self.cfg >= 0:
            raise ConfigError(f"cfg (guidance scale) must be >= 0, got {self.cfg!r}")


@dataclass
class LikelihoodResult:
    """Per request (input order): ``logprob`` the estimate, ``greedy`` the flag; and what it cost."""

    logprob: np.ndarray  # [N] float64
    greedy: np.ndarray  # [N] bool
    mc_rows: int  # sampled rows scored (N x mc_num for non-empty continuations)
    forwards: int  # batch forwards (x2 with cfg > 0), estimate and greedy check together
    wall_s: float


def mask_counts(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """[n] numbers of masked tokens in 1..length, stratified: one uniform offset k, then k + j*length/n rounded
    and wrapped into 1..length (LLaDA's evaluation draws them alike, per batch)."""
    k = int(rng.integers(1, length + 1))
    x = np.round(k + np.arange(n) * (length / n)).astype(np.int64)
    return (x - 1) % length + 1


def sample_masks(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks [n, length] bool with exactly counts[j] True per row at uniform positions, counts [n])."""
    counts = mask_counts(rng, n, length)
    ranks = np.argsort(np.argsort(rng.random((n, length)), axis=1), axis=1)
    return ranks < counts[:, None], counts


def request_rng(seed: int, context: Sequence[int], continuation: Sequence[int]) -> np.random.Generator:
    """The masks' generator of one request: keyed by the seed and the request's ids (not its position)."""
    c = np.asarray(context, np.int64).tobytes()
    t = np.asarray(continuation, np.int64).tobytes()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(c), zlib.crc32(t), len(context),
                                  len(continuation)])


def _logits_tail(model, ids, attn, tail: int, prompt, cfg: float, mask_id: int):
    """float32 logits [B, tail, V] of the last ``tail`` columns, with LLaDA's guidance when ``cfg`` > 0 (the
    unconditional copy has every context token masked)."""
    cond = model.lm_logits(model.hidden_states(ids, attn)[:, -tail:]).astype(jnp.float32)
    if cfg == 0:
        return cond
    un_ids = jnp.where(prompt, mask_id, ids)
    un = model.lm_logits(model.hidden_states(un_ids, attn)[:, -tail:]).astype(jnp.float32)
    return un + (cfg + 1.0) * (cond - un)


@partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _weighted_nll(graphdef, state, ids, attn, prompt, target, weight, tail: int, cfg: float, mask_id: int):
    """Per row: sum over the last ``tail`` columns of weight * -log p(target). ids/attn/prompt [B, W],
    target/weight [B, tail] (weight L/l at masked continuation positions, 0 elsewhere)."""
    model = nnx.merge(graphdef, state)
    logp = jax.nn.log_softmax(_logits_tail(model, ids, attn, tail, prompt, cfg, mask_id), axis=-1)
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weight, axis=-1)


@partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _greedy_match(graphdef, state, ids, attn, prompt, target_cols, tail: int, cfg: float, mask_id: int):
    """LLaDA's greedy check: from ids [B, W] (continuation masked), ``tail`` steps each filling the masked tail
    position of highest confidence (max softmax probability) with its argmax; returns the filled tail [B, tail].
    ``target_cols`` [B, tail] marks the continuation's columns (rows with a shorter one finish early)."""
    model = nnx.merge(graphdef, state)

    def step(_, x):
        probs = jax.nn.softmax(_logits_tail(model, x, attn, tail, prompt, cfg, mask_id), axis=-1)
        x0 = jnp.argmax(probs, axis=-1).astype(x.dtype)
        conf = jnp.max(probs, axis=-1)
        cand = (x[:, -tail:] == mask_id) & target_cols
        pick = jnp.argmax(jnp.where(cand, conf, -jnp.inf), axis=-1)
        hit = (jax.nn.one_hot(pick, tail, dtype=bool)) & cand
        return x.at[:, -tail:].set(jnp.where(hit, x0, x[:, -tail:]))

    return jax.lax.fori_loop(0, tail, step, ids)[:, -tail:]


def _tail_width(n: int, width: int) -> int:
    return min(bucket_width(n), width)


def loglikelihood(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                  settings: LikelihoodSettings = LikelihoodSettings()) -> LikelihoodResult:
    """Estimate ``log p(continuation | context)`` for each ``(context ids, continuation ids)`` pair.

    Every context needs at least one token and each pair must fit ``model.cfg.max_sequence_length`` (the caller
    truncates contexts). An empty continuation has log-likelihood 0 and is greedy.
    """
    t0 = time.perf_counter()
    mcfg = model.cfg
    mask_id, pad = int(mcfg.mask_token_id), pad_id_of(mcfg)
    limit = int(mcfg.max_sequence_length)
    ctxs = [np.asarray(c, np.int64).reshape(-1) for c in (p[0] for p in pairs)]
    tgts = [np.asarray(t, np.int64).reshape(-1) for t in (p[1] for p in pairs)]
    n = len(ctxs)
    for i, (c, t) in enumerate(zip(ctxs, tgts, strict=True)):
        if len(c) == 0:
            raise ConfigError(f"request {i} has an empty context: give at least one token (e.g. BOS)")
        if len(c) + len(t) > limit:
            raise ConfigError(f"request {i} has {len(c) + len(t)} tokens, more than the model's "
                              f"max_sequence_length {limit}: truncate its context")
    logprob = np.zeros(n, np.float64)
    greedy = np.ones(n, bool) if settings.greedy else np.zeros(n, bool)
    graphdef, state = nnx.split(model)
    b = settings.mc_batch
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if len(tgts[i]):
            w = min(bucket_width(len(ctxs[i]) + len(tgts[i])), limit)
            groups.setdefault((w, _tail_width(len(tgts[i]), w)), []).append(i)
    forwards = rows_done = 0
    per_fwd = 2 if settings.cfg > 0 else 1
    pending = []  # (owners [b], device nll [b], rows used): read back at the end so batches dispatch ahead
    for (w, tail), idx in sorted(groups.items()):
        batch = _RowBatch(b, w, tail)
        for i in idx:
            c, t = ctxs[i], tgts[i]
            masks, counts = sample_masks(request_rng(settings.seed, c, t), settings.mc_num, len(t))
            ids = np.full((settings.mc_num, w), pad, np.int32)
            ids[:, w - len(c) - len(t):w - len(t)] = c
            ids[:, w - len(t):] = np.where(masks, mask_id, t)
            tgt = np.zeros(tail, np.int32)
            tgt[tail - len(t):] = t
            wt = np.zeros((settings.mc_num, tail), np.float32)
            wt[:, tail - len(t):] = np.where(masks, (len(t) / counts)[:, None], 0.0)
            for start in range(0, settings.mc_num, b):
                rows = slice(start, min(start + b, settings.mc_num))
                if batch.add(i, ids[rows], len(c), len(t), tgt, wt[rows]):
                    pending.append(batch.run(graphdef, state, settings.cfg, mask_id))
        if batch.used:
            pending.append(batch.run(graphdef, state, settings.cfg, mask_id))
        rows_done += len(idx) * settings.mc_num
        forwards += -(-len(idx) * settings.mc_num // b) * per_fwd
        if settings.greedy:
            g_ids = np.full((len(idx), w), pad, np.int64)
            cols = np.zeros((len(idx), tail), bool)
            tg = np.zeros((len(idx), tail), np.int64)
            for r, i in enumerate(idx):
                c, t = ctxs[i], tgts[i]
                g_ids[r, w - len(c) - len(t):w - len(t)] = c
                g_ids[r, w - len(t):] = mask_id
                cols[r, tail - len(t):] = True
                tg[r, tail - len(t):] = t
            filled = _run_greedy(graphdef, state, b, w, tail, settings.cfg, mask_id, g_ids,
                                 np.asarray([len(ctxs[i]) + len(tgts[i]) for i in idx]),
                                 np.asarray([len(ctxs[i]) for i in idx]), cols)
            greedy[idx] = np.all((filled == tg) | ~cols, axis=1)
            forwards += -(-len(idx) // b) * tail * per_fwd
    for owners, nll, used in pending:
        np.add.at(logprob, owners[:used], -np.asarray(nll, np.float64)[:used])
    counted = [i for i in range(n) if len(tgts[i])]
    logprob[counted] /= settings.mc_num
    return LikelihoodResult(logprob=logprob, greedy=greedy, mc_rows=rows_done, forwards=forwards,
                            wall_s=time.perf_counter() - t0)


class _RowBatch:
    """A fixed [b, W] batch of Monte Carlo rows being filled; rows of one request may span two batches.
    Unused rows keep weight 0 (they add nothing)."""

    def __init__(self, b: int, w: int, tail: int):
        self.b, self.w, self.tail = b, w, tail
        self._reset()

    def _reset(self) -> None:
        b, w, tail = self.b, self.w, self.tail
        self.ids = np.zeros((b, w), np.int32)
        self.attn = np.zeros((b, w), np.int32)
        self.attn[:, -1] = 1  # an unused row attends to one position (never an all-masked softmax)
        self.prompt = np.zeros((b, w), bool)
        self.tgt = np.zeros((b, tail), np.int32)
        self.wt = np.zeros((b, tail), np.float32)
        self.owner = np.zeros(b, np.int64)
        self.used = 0

    def add(self, i: int, ids: np.ndarray, n_ctx: int, n_tgt: int, tgt: np.ndarray, wt: np.ndarray) -> bool:
        """Append rows (ids [r, W], weights [r, tail]) of request i; True when the batch is full. The caller
        passes at most ``b`` rows and runs the batch as soon as it is full, so rows never overflow."""
        k = min(len(ids), self.b - self.used)
        rest = len(ids) - k
        r = slice(self.used, self.used + k)
        self.ids[r], self.tgt[r], self.wt[r], self.owner[r] = ids[:k], tgt, wt[:k], i
        start = self.w - n_ctx - n_tgt
        self.attn[r] = 0
        self.attn[r, start:] = 1
        self.prompt[r] = False
        self.prompt[r, start:start + n_ctx] = True
        self.used += k
        if rest:  # what did not fit goes into the next batch after this one is run
            self._overflow = (i, ids[k:], n_ctx, n_tgt, tgt, wt[k:])
        return self.used == self.b

    def run(self, graphdef, state, cfg: float, mask_id: int):
        """Dispatch the forward (asynchronously) and start an empty batch with any rows that did not fit."""
        nll = _weighted_nll(graphdef, state, jnp.asarray(self.ids), jnp.asarray(self.attn),
                            jnp.asarray(self.prompt), jnp.asarray(self.tgt), jnp.asarray(self.wt), self.tail,
                            float(cfg), mask_id)
        out = (self.owner.copy(), nll, self.used)
        overflow = getattr(self, "_overflow", None)
        self._overflow = None
        self._reset()
        if overflow is not None:
            self.add(*overflow)
        return out


def _masks(w: int, lengths: np.ndarray, ctx_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attention [R, W] over the real tokens, context columns [R, W]) of left-padded rows."""
    col = np.arange(w)[None, :]
    start = w - lengths[:, None]
    return (col >= start).astype(np.int32), (col >= start) & (col < start + ctx_len[:, None])


def _chunks(b: int, *arrays):
    """Fixed [b, ...] chunks of the row arrays; the last one filled with copies of row 0 (results dropped)."""
    r = len(arrays[0])
    for s in range(0, r, b):
        idx = np.arange(s, s + b)
        real = idx < r
        idx = np.where(real, idx, 0)
        yield int(real.sum()), [a[idx] for a in arrays]


def _run_greedy(graphdef, state, b, w, tail, cfg, mask_id, ids, lengths, ctx_len, cols) -> np.ndarray:
    attn, prompt = _masks(w, lengths, ctx_len)
    out = []
    for k, (i_, a_, p_, c_) in _chunks(b, ids, attn, prompt, cols):
        filled = _greedy_match(graphdef, state, jnp.asarray(i_, jnp.int32), jnp.asarray(a_), jnp.asarray(p_),
                               jnp.asarray(c_), tail, float(cfg), mask_id)
        out.append(np.asarray(filled)[:k])
    return np.concatenate(out)
