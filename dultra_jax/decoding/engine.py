"""The decoding engine: a fixed number of rows ("slots") fed from a queue of prompts (continuous batching).

A slot takes the next queued prompt as soon as its own prompt is done, so no row idles while prompts wait. The
device holds the whole batch state (canvas, per-row block/NFE counters, keys, the KV cache); the host holds
only which request sits in which slot. One :meth:`DecodeEngine.step` is: clear finished slots and admit
queued prompts into free ones (one compiled scatter), run one compiled segment of the per-row decoding loop
(until some slot is done, or ``segment`` iterations), read back two [slots] counters, and only when some slot
finished, its canvas rows. Rows advance through their blocks independently (``schedule="per_row"``) and draw
their randomness from their own seed and NFE, so each request's result equals
``generate(model, [prompt], row_seeds=[seed], ...)`` of it alone, whatever else shares the batch.

Prompt width: all slots share one left-padded prompt width (padding-aware attention makes the padding
invisible to each row), the smallest allowed width that fits every prompt in a slot. Admitting a longer
prompt widens the running batch in place (canvas, masks and cache are left-padded: positions count real
tokens only, so running rows compute the same), and the width narrows again once the long prompts are gone.
The loop compiles once per width used, so the allowed widths (:func:`bucket_width`'s geometric ladder by
default, or :func:`merge_widths` for a known set of prompts) bound the compiles.

Admission order: ``admission="fifo"`` fills free slots in queue order (``generate_many`` submits its prompts
sorted by length, so that already keeps widths narrow). A server sees prompts in arrival order, where one long
prompt among short ones makes every slot pay its width: ``admission="width"`` lets a free slot take the queued
prompt of the widest width that fits the batch's current one (the batch pays it anyway; the shorter prompts wait
for a narrow batch), else of the narrowest width, the oldest of those; and the head of the queue once it has
been passed over ``2 * slots`` times (no prompt waits without bound). Order never changes a result, only which
rows share a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.decoding import kv_cache, loop
from dultra_jax.model.dultra import DUltra

SEGMENT = 64  # default cap on the iterations of one compiled segment (a streaming host sees progress this often)


@dataclass(frozen=True)
class Finished:
    """A request that left the engine (done, or cancelled)."""

    handle: int
    tokens: np.ndarray  # [len(prompt) + gen_length] int32, the prompt's ids then the generated ids
    nfe: int  # backbone forwards this prompt was decoding in (as generate() counts it)
    iterations: int  # batch iterations it spent in its slot (>= nfe: it may wait for a cache refresh)
    cancelled: bool = False
    width: int = 0  # the widest padded prompt width it was decoded at
    equivalent_forwards: float = 0.0  # its FLOP-weighted forwards (see DecodeResult)


def bucket_width(n: int) -> int:
    """Padded prompt width for a prompt of n tokens: the next of 16, 24, 32, 48, 64, 96, ... (<= 1.5x n)."""
    w = 16
    while w < n:
        w = w * 3 // 2 if (w & (w - 1)) == 0 else w * 4 // 3
    return w


def merge_widths(lengths: Sequence[int], gen_length: int, *, tolerance: float = 0.03) -> list[int]:
    """The widths to decode prompts of these ``lengths`` at: the geometric ladder (:func:`bucket_width`) of the
    widths present, merging a width into the next wider one while the canvas positions that adds (each of its
    prompts pays the wider width + gen_length per forward) stay within ``tolerance`` of all prompts' canvas
    positions in total. Fewer widths are fewer compiles; the cost is padded positions, not prompt counts."""
    count: dict[int, int] = {}
    for n in lengths:
        w = bucket_width(int(n))
        count[w] = count.get(w, 0) + 1
    widths = sorted(count)
    total = sum(c * (w + gen_length) for w, c in count.items())
    budget = tolerance * total
    while len(widths) > 1:
        extra = [count[w] * (widths[k + 1] - w) for k, w in enumerate(widths[:-1])]
        k = int(np.argmin(extra))
        if extra[k] > budget:
            break
        budget -= extra[k]
        count[widths[k + 1]] += count.pop(widths[k])
        del widths[k]
    return widths


@dataclass
class _Request:
    handle: int
    prompt: np.ndarray  # [n] int32
    seed: int
    width: int = 0  # widest width while in a slot
    admitted_at: int = 0  # engine iteration at admission
    passed: int = 0  # later requests admitted before it (admission="width")


class DecodeEngine:
    """Slots fed from a queue: ``submit`` prompts, call ``step`` until it returns False, ``harvest`` results.

    ``cfg`` is the decoding configuration (its ``schedule`` is set to per_row here; ``return_trajectory``,
    ``on_block`` are not available: a slot's trajectory would be indexed by batch iterations it shares).
    ``rng`` is the run key each request's seed is folded into (as :func:`generate`'s ``rng``); ``widths`` the
    allowed padded prompt widths (default: the :func:`bucket_width` ladder); ``segment`` caps the iterations of
    one :meth:`step`; ``admission`` is ``"fifo"`` or ``"width"`` (see the module's docstring).
    """

    def __init__(self, model: DUltra, cfg: loop.DecodeConfig, *, slots: int, plan=None,
                 rng: jax.Array | int | None = None, widths: Sequence[int] | None = None, segment: int = SEGMENT,
                 admission: str = "fifo"):
        if not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        if cfg.return_trajectory or cfg.on_block is not None:
            raise ValueError("DecodeEngine does not record trajectories or stream blocks: use generate for those")
        if segment <= 0:
            raise ValueError(f"segment must be a positive number of iterations, got {segment}")
        if admission not in ("fifo", "width"):
            raise ValueError(f"admission must be 'fifo' or 'width', got {admission!r}")
        self._admission = admission
        self.cfg = dataclasses.replace(cfg, schedule="per_row")
        self.model = model
        self.mcfg = model.cfg
        self.plan = plan
        self._graphdef, state = nnx.split(model)
        self._state = plan.shard_state(state) if plan is not None else state
        if plan is not None and slots % plan.batch_shards:
            raise ValueError(f"slots ({slots}) must be a multiple of the mesh's {plan.batch_shards} batch shards")
        self._key = jax.random.key(0 if rng is None else rng) if rng is None or isinstance(rng, int) else rng
        self._widths = None if widths is None else sorted(int(w) for w in widths)
        self._segment = int(segment)
        self._n = slots
        self._queue: deque[_Request] = deque()
        self._slot: list[_Request | None] = [None] * slots
        self._clear = np.zeros(slots, bool)  # slots whose request left: reset to empty at the next admit
        self._cancelled: set[int] = set()
        self._finished: list[Finished] = []
        self._next_handle = 0
        self._width: int | None = None
        self._st: loop.LoopState | None = None
        self._rows: loop.Rows | None = None
        self._host_x: np.ndarray | None = None  # the canvas read back since the last segment (committed())
        self.iterations = 0  # batch iterations run in total
        self.segments = 0  # compiled segments run
        self.segment_s = 0.0  # wall time inside segments (dispatch to the status read back)
        self.host_s = 0.0  # wall time of step() outside segments (admission, harvest, width changes)
        self.widths_used: set[int] = set()

    # ------------------------------------------------------------------------------------------ the queue
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self._slot)

    @property
    def slots(self) -> int:
        return self._n

    def submit(self, prompt_ids: Sequence[int], *, seed: int | None = None) -> int:
        """Queue a prompt; returns its handle. Its randomness is keyed by ``seed`` (default: the handle)."""
        prompt = np.asarray(prompt_ids, np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError("submit got an empty prompt: every prompt needs at least one token")
        loop.check_prompts(prompt[None], self.mcfg, self.cfg.gen_length)
        h = self._next_handle
        self._next_handle += 1
        self._queue.append(_Request(handle=h, prompt=prompt.astype(np.int32), seed=h if seed is None else int(seed)))
        return h

    def cancel(self, handle: int) -> None:
        """Drop a queued or running request; it is harvested as cancelled (its slot frees at the next step)."""
        for r in self._queue:
            if r.handle == handle:
                self._queue.remove(r)
                tokens = np.concatenate([r.prompt, np.full(self.cfg.gen_length, self.mcfg.mask_token_id, np.int32)])
                self._finished.append(Finished(handle=handle, tokens=tokens, nfe=0, iterations=0, cancelled=True))
                return
        if any(r is not None and r.handle == handle for r in self._slot):
            self._cancelled.add(handle)

    def running(self) -> list[int]:
        """Handles of the requests in slots."""
        return [r.handle for r in self._slot if r is not None]

    def harvest(self) -> list[Finished]:
        """Everything finished or cancelled since the last harvest."""
        out, self._finished = self._finished, []
        return out

    def committed(self, handle: int) -> np.ndarray | None:
        """The generated ids of a running request committed so far as a left-to-right prefix (no MASK before
        them); None when the handle is not in a slot."""
        s = next((k for k, r in enumerate(self._slot) if r is not None and r.handle == handle), None)
        if s is None or self._st is None:
            return None
        if self._host_x is None:
            self._host_x = np.asarray(self._st.x)
        gen = self._host_x[s, self._width:]
        masked = np.nonzero(gen == self.mcfg.mask_token_id)[0]
        return gen[:masked[0] if masked.size else gen.size].copy()

    # ------------------------------------------------------------------------------------------ stepping
    def step(self) -> bool:
        """Admit queued prompts into free slots and run one compiled segment; False when there was nothing to do."""
        t0 = time.perf_counter()
        with self.plan.context() if self.plan is not None else contextlib.nullcontext():
            ran = self._step()
        self.host_s += time.perf_counter() - t0
        return ran

    def _step(self) -> bool:
        self._drop_cancelled()
        fills = []
        for s in range(self._n):
            if self._slot[s] is None and self._queue:
                self._slot[s] = self._next_request()
                fills.append(s)
        busy = [r for r in self._slot if r is not None]
        if not busy:
            if self._clear.any() and self._st is not None:
                self._admit([])  # leave the slots empty but clean
            return False
        width = self._width_for(max(len(r.prompt) for r in busy))
        if self._st is None:
            self._start(width)
        elif width != self._width:
            self._st, self._rows = _repad(self._st, self._rows, self._width, width, loop.pad_id_of(self.mcfg))
            self._width = width
        for r in busy:
            r.width = max(r.width, width)
        for s in fills:
            self._slot[s].admitted_at = self.iterations
        if fills or self._clear.any():
            self._admit(fills)
        self.widths_used.add(width)
        t0 = time.perf_counter()
        st, status = _segment(self._graphdef, self._state, self._st, self._rows,
                              jnp.int32(self.iterations + self._segment), width, self.cfg)
        self._st, self._host_x = st, None
        done, nfe, it = _host(status)
        dt = time.perf_counter() - t0
        self.segment_s += dt
        self.host_s -= dt  # step() adds the whole step: the segment is not host time
        self.segments += 1
        self.iterations = it
        finished = [s for s in range(self._n) if self._slot[s] is not None and done[s]]
        if finished:
            x, eq = (np.asarray(a) for a in jax.device_get((self._st.x, self._st.eq)))
            self._host_x = x
            for s in finished:
                self._emit(s, x, int(nfe[s]), float(eq[s]), cancelled=False)
        return True

    def run(self) -> list[Finished]:
        """Step until the queue and the slots are empty; everything harvested."""
        while self.step():
            pass
        return self.harvest()

    # ------------------------------------------------------------------------------------------ internals
    def _next_request(self) -> _Request:
        """The queued request a free slot takes (see ``admission``)."""
        head = self._queue[0]
        if self._admission == "fifo" or head.passed >= 2 * self._n:
            return self._queue.popleft()
        busy = [len(r.prompt) for r in self._slot if r is not None]
        width = self._width_for(max(busy)) if busy else 0
        best, pick = None, 0
        for k, r in enumerate(self._queue):  # the oldest of the best width
            w = self._width_for(len(r.prompt))
            key = (0, -w) if w <= width else (1, w)  # the widest that fits (the batch pays it anyway), else the
            if best is None or key < best:  # narrowest, so short prompts are left for narrow batches
                best, pick = key, k
        for earlier in itertools.islice(self._queue, pick):
            earlier.passed += 1
        r = self._queue[pick]
        del self._queue[pick]
        return r

    def _width_for(self, n: int) -> int:
        if self._widths is not None:
            fit = [w for w in self._widths if w >= n]
            if fit:
                return fit[0]
        return min(bucket_width(n), max(n, self.mcfg.max_sequence_length - self.cfg.gen_length))

    def _emit(self, s: int, x: np.ndarray, nfe: int, eq: float, *, cancelled: bool) -> None:
        r = self._slot[s]
        tokens = np.concatenate([r.prompt, x[s, self._width:]]).astype(np.int32)
        self._finished.append(Finished(handle=r.handle, tokens=tokens, nfe=nfe,
                                       iterations=self.iterations - r.admitted_at, cancelled=cancelled,
                                       width=r.width, equivalent_forwards=eq))
        self._slot[s] = None
        self._clear[s] = True

    def _drop_cancelled(self) -> None:
        running = [s for s, r in enumerate(self._slot) if r is not None and r.handle in self._cancelled]
        self._cancelled.clear()
        if not running:
            return
        x, nfe, eq = (np.asarray(a) for a in jax.device_get((self._st.x, self._st.nfe, self._st.eq)))
        for s in running:
            self._emit(s, x, int(nfe[s]), float(eq[s]), cancelled=True)

    def _start(self, width: int) -> None:
        """The batch state with every slot empty, at ``width``."""
        n, g = self._n, self.cfg.gen_length
        ids = np.full((n, width + g), loop.pad_id_of(self.mcfg), np.int32)
        mask = np.ones((n, width + g), np.int32)
        seeds = np.zeros(n, np.int32)
        put = self.plan.shard_batch if self.plan is not None else jnp.asarray  # slots split over the data axes
        self._st, self._rows = _empty(self._graphdef, self._state, put(ids), put(mask), self._key, put(seeds),
                                      width, self.cfg)
        self._width = width

    def _admit(self, fills: list[int]) -> None:
        """One compiled scatter: reset the slots in ``_clear`` to empty and put each ``fills`` slot's prompt in."""
        n, w = self._n, self._width
        pad = loop.pad_id_of(self.mcfg)
        where = np.full(n, n, np.int32)  # row k of the arrays goes to slot where[k] (n: nowhere)
        ids = np.full((n, w), pad, np.int32)
        mask = np.zeros((n, w), np.int32)
        seeds = np.zeros(n, np.int32)
        for k, s in enumerate(fills):
            r = self._slot[s]
            where[k] = s
            ids[k, w - len(r.prompt):] = r.prompt
            mask[k, w - len(r.prompt):] = 1
            seeds[k] = r.seed
        clear = self._clear.copy()
        clear[fills] = False
        self._st, self._rows = _admit_rows(self._st, self._rows, jnp.asarray(clear), jnp.asarray(where),
                                           jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seeds), self._key, w,
                                           self.cfg, loop.pad_id_of(self.mcfg), self.mcfg.mask_token_id)
        self._clear[:] = False


def _host(status) -> tuple[np.ndarray, np.ndarray, int]:
    """(done [n] bool, nfe [n], batch iterations) from the segment's one status array."""
    a = np.asarray(status)
    return a[0].astype(bool), a[1], int(a[2, 0])


@partial(jax.jit, static_argnums=(0, 6, 7))
def _empty(graphdef, state, ids, mask, key, seeds, width: int, cfg: loop.DecodeConfig):
    rws = loop._rows(key, seeds, mask, ids.shape[1])
    st = loop._initial_state(graphdef, state, ids, rws, width, cfg)
    st = dataclasses.replace(st, block=jnp.full_like(st.block, cfg.num_blocks))
    return st, rws


@partial(jax.jit, static_argnums=(0, 5, 6))
def _segment(graphdef, state, st, rws, until_it, width: int, cfg: loop.DecodeConfig):
    st = loop._run(graphdef, state, st, rws, None, width, cfg, until_a_row_is_done=True, until_it=until_it)
    done = loop._row_done(st, cfg).astype(jnp.int32)
    status = jnp.stack([done, st.nfe, jnp.full_like(st.nfe, st.it)])
    return st, status


@partial(jax.jit, static_argnums=(8, 9, 10, 11))
def _admit_rows(st: loop.LoopState, rws: loop.Rows, clear, where, ids, mask, seeds, key, width: int,
                cfg: loop.DecodeConfig, pad_id: int, mask_id: int):
    """Slots in ``clear`` become empty (pads, attends everywhere, done, NFE 0); row k of ``ids``/``mask`` [n, W]
    becomes slot ``where[k]``'s prompt (MASKs after it, block 0, its key folded from ``seeds[k]``)."""
    n, length = st.x.shape
    g, nb = cfg.gen_length, cfg.num_blocks
    c = clear[:, None]
    x = jnp.where(c, pad_id, st.x)
    m = jnp.where(c, 1, rws.mask)
    block = jnp.where(clear, nb, st.block)
    zero_i = jnp.zeros((n,), jnp.int32)
    nfe = jnp.where(clear, 0, st.nfe)
    eq = jnp.where(clear, 0.0, st.eq)
    step = jnp.where(clear, 0, st.step_in_block)
    row_len = jnp.where(clear, float(length), rws.length)
    new_x = jnp.concatenate([ids, jnp.full((n, g), mask_id, jnp.int32)], axis=1)
    new_m = jnp.concatenate([mask, jnp.ones((n, g), jnp.int32)], axis=1)
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(seeds)
    put = lambda a, v: a.at[where].set(v, mode="drop")  # noqa: E731
    st = dataclasses.replace(
        st, x=put(x, new_x), block=put(block, zero_i), step_in_block=put(step, zero_i),
        block_n=put(st.block_n, jnp.full((n,), cfg.block_length, jnp.int32)), nfe=put(nfe, zero_i),
        eq=put(eq, jnp.zeros((n,), jnp.float32)))
    rws = loop.Rows(keys=put(rws.keys, keys), length=put(row_len, new_m.sum(-1).astype(jnp.float32)),
                    mask=put(m, new_m))
    return st, rws


@partial(jax.jit, static_argnums=(2, 3, 4))
def _repad(st: loop.LoopState, rws: loop.Rows, old: int, new: int, pad_id: int):
    """The batch at prompt width ``new`` instead of ``old``: columns added (masked-out pads) or dropped on
    the left of the canvas, its key mask and its cache. Dropped columns are pads of every row."""
    def cols(a, axis, fill):
        if new > old:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (new - old, 0)
            return jnp.pad(a, widths, constant_values=fill)
        return jax.lax.slice_in_dim(a, old - new, a.shape[axis], axis=axis)

    cache = None if st.cache is None else jax.tree.map(lambda a: cols(a, a.ndim + kv_cache.POSITION_AXIS, 0),
                                                       st.cache)
    st = dataclasses.replace(st, x=cols(st.x, 1, pad_id), cache=cache)
    return st, dataclasses.replace(rws, mask=cols(rws.mask, 1, 0))
