"""One compiled decoding loop for every reveal rule: ``lax.while_loop`` over iterations on a fixed canvas.

Canvas [B, P+G] = [left-padded prompt | MASK x G], decoded block by block (semi-autoregressively). Each
iteration: one backbone forward (over the canvas, or a window of it with a cache), LM-head logits and token
proposals for each row's current block only, for the planner its head with queries restricted to the block
(the original computes both everywhere and uses only the block: restricting is exact), a reveal rule, and the
update. The iteration state is a named pytree (:class:`LoopState`).

Schedules: ``sync`` (the default, the original's) keeps one block index for the batch: a row that has
finished the block waits (unchanged, not counted in its NFE) until all rows have; blocks with no MASK left in
any row are skipped without a forward. ``per_row`` gives each row its own block index, so a row starts its
next block as soon as its own is done (no idle rows); each row's result is the same as under ``sync``. With a
KV cache, ``sync`` refreshes it for the whole batch at a block's first iteration; ``per_row`` refreshes each
row's cache when that row starts a block (a sub-batch of up to ``refresh_rows`` rows per iteration gets the
exact forward; every row runs its cached window at its own block: docs/engine.md).

Randomness is per row and per the row's own iteration count (its NFE so far), so a row's result does not
depend on what else is in the batch: with ``row_seeds`` a batch-1 run reproduces any row of a batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.decoding import kv_cache, rules
from dultra_jax.decoding import planner_step as ps
from dultra_jax.decoding.cost import iteration_cost
from dultra_jax.decoding.reveal import BlockStep, rule_of
from dultra_jax.model.dultra import DUltra
from dultra_jax.model.layers import WindowStart, positions_and_mask, take_positions

Strategy = Literal["planner", "threshold", "factor", "fixed"]
STRATEGIES = ("planner", "threshold", "factor", "fixed")
Schedule = Literal["sync", "per_row"]
SCHEDULES = ("sync", "per_row")
LayerLoop = Literal["scan", "unrolled"]
LAYER_LOOPS = ("scan", "unrolled")


@dataclass(frozen=True)
class DecodeConfig:
    """Static decoding settings (hashable: one compiled loop per distinct config)."""

    gen_length: int
    block_length: int
    strategy: Strategy = "planner"
    reveal: Literal["bernoulli", "topk"] = "bernoulli"
    temperature: float = 0.0
    threshold: float = 0.9
    factor: float = 1.0
    factor_rule: Literal["original", "corrected"] = "original"
    steps: int | None = None
    planner_temperature: float | None = None
    exclude_mask: bool | None = None
    early_stop: bool = False
    stop_id: int | None = None  # end-of-text id for early_stop (default: the model's eos_token_id)
    return_trajectory: bool = False
    max_iterations: int | None = None
    cache: Literal["none", "prefix", "dual"] = "none"
    schedule: Schedule = "sync"
    # per_row with a cache: rows given their refresh forward per iteration (a row starting a block beyond them
    # waits an iteration, uncounted); default a quarter of the batch, at least 1
    refresh_rows: int | None = None
    # when a cached run recomputes K/V at a block's first iteration (kv_cache.REFRESH_POLICIES; "full" = all)
    refresh: kv_cache.RefreshPolicy = "full"
    # "unrolled": per-layer weight buffers (one copy of the layers' weights per call) and an unrolled layer
    # loop, so an iteration reads each weight once in place; "scan" slices each layer out of the stack
    layer_loop: LayerLoop = "scan"
    # host callback(finished [B] bool, first [B] int, end [B] int, generated [B, G] int) called from the compiled
    # loop whenever some row finalises blocks [first, end) (``dultra generate --stream``); compiled per callback
    # object (the loop stays one compiled while_loop: the call is a jax.debug.callback)
    on_block: Callable | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}")
        if self.gen_length <= 0 or self.block_length <= 0:
            raise ValueError(f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be > 0")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})"
            )
        if self.reveal not in ("bernoulli", "topk"):
            raise ValueError(f"unknown reveal {self.reveal!r}; choose 'bernoulli' or 'topk'")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.planner_temperature is not None and self.planner_temperature <= 0:
            raise ValueError(f"planner_temperature must be > 0, got {self.planner_temperature}")
        if self.factor_rule not in ("original", "corrected"):
            raise ValueError(f"factor_rule must be 'original' or 'corrected', got {self.factor_rule!r}")
        if self.strategy == "fixed":
            steps = self.gen_length if self.steps is None else self.steps
            if steps <= 0 or steps % self.num_blocks:
                raise ValueError(
                    f"steps ({steps}) must be a positive multiple of the number of blocks ({self.num_blocks})"
                )
        if self.cache not in kv_cache.CACHE_MODES:
            raise ValueError(f"unknown cache {self.cache!r}; choose one of {list(kv_cache.CACHE_MODES)}")
        if self.refresh not in kv_cache.REFRESH_POLICIES:
            raise ValueError(f"unknown refresh {self.refresh!r}; choose one of {list(kv_cache.REFRESH_POLICIES)}")
        if self.refresh != "full" and self.cache == "none":
            raise ValueError(f"refresh={self.refresh!r} needs a cache: set cache='prefix' or 'dual'")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"unknown layer_loop {self.layer_loop!r}; choose one of {list(LAYER_LOOPS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.refresh_rows is not None and self.refresh_rows <= 0:
            raise ValueError(f"refresh_rows must be a positive number of rows, got {self.refresh_rows}")
        if self.schedule == "per_row" and self.cache != "none" and (self.refresh, self.layer_loop) != ("full", "scan"):
            off = [f"{k}={v!r}" for k, v in (("refresh", self.refresh), ("layer_loop", self.layer_loop))
                   if v != {"refresh": "full", "layer_loop": "scan"}[k]]
            verb = "need" if len(off) > 1 else "needs"
            raise ValueError(
                f"schedule='per_row' with a cache (continuous batching) refreshes each row with a full forward over "
                f"the scanned layers: {' and '.join(off)} {verb} schedule='sync' (sync batches: `--batching "
                "batched` on the command line), or set refresh='full', layer_loop='scan'")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return (self.gen_length if self.steps is None else self.steps) // self.num_blocks

    @property
    def excludes_mask(self) -> bool:
        """The planner never proposes MASK (the original sets its logit to -inf); the baselines, like the
        original's Fast-dLLM code, do unless asked."""
        return self.strategy == "planner" if self.exclude_mask is None else self.exclude_mask

    @property
    def iteration_cap(self) -> int:
        """Planner and MASK-excluding rules reveal >= 1 real token per row per iteration, so G bounds them;
        a baseline that proposes MASK can re-mask, so it gets slack (rows still masked at the cap stop)."""
        if self.max_iterations is not None:
            return self.max_iterations
        return self.gen_length if self.excludes_mask else 2 * self.gen_length


@jax.tree_util.register_dataclass
@dataclass
class Trajectory:
    """Per-iteration records for GRPO ([S, B, L], S = cap); steps >= num_steps are all-False / zero. Every
    strategy records reveals and proposals (the step penalty reads them); only the planner has ``logps``."""

    reveal: jax.Array
    proposals: jax.Array
    logps: jax.Array
    num_steps: jax.Array


@jax.tree_util.register_dataclass
@dataclass
class DecodeResult:
    tokens: jax.Array  # [B, P+G]
    nfe: jax.Array  # [B] forwards in which the row was still decoding
    iterations: jax.Array  # [] forwards for the batch
    equivalent_forwards: jax.Array  # [B] the row's forwards weighted by FLOPs relative to an exact iteration
    prompt_length: int = dataclasses.field(metadata=dict(static=True))
    trajectory: Trajectory | None = None

    @property
    def generated(self) -> jax.Array:
        return self.tokens[:, self.prompt_length:]


# ------------------------------------------------------------------------------------------ inputs
def pad_id_of(mcfg) -> int:
    """The id left padding uses: the model's pad id, else its end-of-text id (attention masks pads out)."""
    return mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_id or 0)


def pad_prompts(prompts, pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad a list of 1-D id sequences (or pass through a [B, P] array) -> (ids, 0/1 mask), to ``width``
    columns (default: the longest prompt's)."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        ids = np.asarray(prompts)
        if ids.shape[1] == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt token per row")
        return ids.astype(np.int32), np.ones(ids.shape, np.int32)
    rows = id_rows(prompts)
    if not rows:
        raise ValueError("prompt_ids holds no prompts")
    if any(len(r) == 0 for r in rows):
        raise ValueError("prompt_ids contains an empty prompt: every row needs at least one token")
    longest = max(len(r) for r in rows)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"a prompt of {longest} tokens does not fit a padded width of {width}")
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def id_rows(prompts) -> list[np.ndarray]:
    """A list of 1-D id sequences as int64 rows; text (or a tokenizer's dict output) is one clear error."""
    text_hint = ("prompt_ids must be token ids (a list of int lists), got text; encode it first "
                 "(dultra_jax.text.TextModel.encode, or the tokenizer's input_ids)")
    if isinstance(prompts, (str, dict)) or any(isinstance(p, (str, dict)) for p in prompts):
        raise ValueError(text_hint)
    try:
        return [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{text_hint} ({e})") from None


# ------------------------------------------------------------------------------------------ the loop
def decode_config(*, gen_length: int, block_length: int, strategy: Strategy = "planner",
                  reveal: Literal["bernoulli", "topk"] = "bernoulli", temperature: float = 0.0,
                  threshold: float = 0.9, factor: float = 1.0, steps: int | None = None,
                  return_trajectory: bool = False, **options) -> DecodeConfig:
    """The :class:`DecodeConfig` of :func:`generate`'s keyword arguments (with its defaults)."""
    return DecodeConfig(
        gen_length=gen_length, block_length=block_length, strategy=strategy, reveal=reveal,
        temperature=float(temperature), threshold=float(threshold), factor=float(factor), steps=steps,
        return_trajectory=return_trajectory, **options,
    )


def generate(
    model: DUltra,
    prompt_ids,
    *,
    gen_length: int,
    block_length: int,
    strategy: Strategy = "planner",
    reveal: Literal["bernoulli", "topk"] = "bernoulli",
    temperature: float = 0.0,
    threshold: float = 0.9,
    factor: float = 1.0,
    steps: int | None = None,
    rng: jax.Array | int | None = None,
    return_trajectory: bool = False,
    attention_mask=None,
    pad_aware: bool | None = None,
    row_seeds=None,
    uniforms=None,
    plan=None,
    **options,
) -> DecodeResult:
    """Decode ``gen_length`` tokens after each prompt with the given reveal rule.

    ``prompt_ids``: a [B, P] integer array (equal-length prompts) or a list of 1-D sequences (left-padded
    here). With different lengths (or an ``attention_mask``), attention is padding-aware by default so each
    row equals its batch-1 result; ``pad_aware=False`` keeps the original's pad-attending behaviour.
    ``uniforms`` [S, B, P+G] replaces the Bernoulli draws (for reproducing a recorded rollout).
    ``plan`` (a :class:`dultra_jax.parallel.ShardingPlan`) runs the loop on its mesh: rows split over
    data x fsdp, parameters by the rules, jitted with explicit input shardings under the plan's rules.
    Other ``options`` are :class:`DecodeConfig` fields (``cache`` = none | prefix | dual, ``factor_rule``,
    ``planner_temperature``, ``exclude_mask``, ``early_stop``, ``stop_id``, ``max_iterations``, ``schedule`` =
    sync | per_row, ``refresh`` = full | suffix, ``layer_loop`` = scan | unrolled, ``on_block``).
    """
    cfg = decode_config(gen_length=gen_length, block_length=block_length, strategy=strategy, reveal=reveal,
                        temperature=temperature, threshold=threshold, factor=factor, steps=steps,
                        return_trajectory=return_trajectory, **options)
    mcfg = model.cfg
    pad_id = pad_id_of(mcfg)
    ids, mask = pad_prompts(prompt_ids, pad_id)
    if attention_mask is not None:
        mask = np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != prompt_ids shape {ids.shape}")
    check_prompts(ids, mcfg, gen_length)
    b, p = ids.shape
    if pad_aware is None:
        pad_aware = bool(np.any(mask == 0))
    canvas_mask = np.concatenate([mask, np.ones((b, gen_length), np.int32)], axis=1) if pad_aware else None
    if rng is None:
        rng = 0
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    seeds = np.arange(b, dtype=np.int32) if row_seeds is None else np.asarray(row_seeds, np.int32)
    if seeds.shape != (b,):
        raise ValueError(f"row_seeds must have one seed per row ({b}), got shape {seeds.shape}")
    if uniforms is not None:
        if cfg.schedule != "sync":
            raise ValueError("uniforms are indexed by the batch iteration of the sync schedule: use schedule='sync'")
        uniforms = jnp.asarray(uniforms, jnp.float32)
        if uniforms.ndim != 3 or uniforms.shape[1:] != (b, p + gen_length):
            raise ValueError(f"uniforms must be [S, {b}, {p + gen_length}], got {uniforms.shape}")
    graphdef, state = nnx.split(model)
    if plan is not None:
        return _decode_on_mesh(plan, graphdef, state, ids, canvas_mask, key, seeds, uniforms, cfg)
    return _decode(graphdef, state, jnp.asarray(ids), None if canvas_mask is None else jnp.asarray(canvas_mask),
                   key, jnp.asarray(seeds), uniforms, cfg)


def check_prompts(ids: np.ndarray, mcfg, gen_length: int) -> None:
    """Prompts [B, P] must be known tokens of the vocabulary and fit the model with the generation."""
    if np.any(ids == mcfg.mask_token_id):
        raise ValueError(f"prompt_ids contain the MASK id {mcfg.mask_token_id}; prompts must be fully known")
    if np.any((ids < 0) | (ids >= mcfg.embedding_size)):
        raise ValueError(f"prompt_ids contain ids outside the vocabulary [0, {mcfg.embedding_size})")
    if ids.shape[1] + gen_length > mcfg.max_sequence_length:
        raise ValueError(
            f"prompt length {ids.shape[1]} + gen_length {gen_length} exceeds the model's max_sequence_length "
            f"{mcfg.max_sequence_length}"
        )


_MESH_DECODERS: dict = {}


def mesh_decoder(plan, graphdef, state_shardings, cfg: DecodeConfig, *, with_mask: bool = True,
                 with_uniforms: bool = False):
    """The loop jitted by the sharding plan, explicit shardings for parameters (``state_shardings``), rows and
    per-row inputs: ``fn(state, prompt_ids, canvas_mask, key, row_seeds, uniforms) -> DecodeResult``. One
    compiled loop per plan, model structure and settings; the memory plan lowers this same function."""
    from dultra_jax.parallel import shardings_of

    rows2, rows1 = plan.batch_sharding(2), plan.batch_sharding(1)
    in_shardings = (shardings_of(state_shardings), rows2, rows2 if with_mask else None, plan.replicated, rows1,
                    plan.sharding([None, "activation_batch", None]) if with_uniforms else None)
    key_ = (id(plan), graphdef, cfg, with_mask, with_uniforms)
    if key_ not in _MESH_DECODERS:
        def decode(state, prompt_ids, canvas_mask, key, row_seeds, uniforms):
            res = _decode_impl(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, cfg=cfg)
            return _rows_sharded(plan, res)

        _MESH_DECODERS[key_] = (plan, plan.jit(decode, in_shardings=in_shardings))
    return _MESH_DECODERS[key_][1]


def _rows_sharded(plan, res: DecodeResult) -> DecodeResult:
    """Outputs split over the plan's batch axes like the inputs, never left to the compiler: on several
    processes each one reads its own rows (``multihost.local_rows``), which a replicated output would not give."""
    def rows(a, axis):
        names = [None] * a.ndim
        names[axis] = "activation_batch"
        return jax.lax.with_sharding_constraint(a, plan.sharding(names))

    traj = res.trajectory
    if traj is not None:
        traj = dataclasses.replace(traj, reveal=rows(traj.reveal, 1), proposals=rows(traj.proposals, 1),
                                   logps=rows(traj.logps, 1))
    return dataclasses.replace(res, tokens=rows(res.tokens, 0), nfe=rows(res.nfe, 0),
                               equivalent_forwards=rows(res.equivalent_forwards, 0), trajectory=traj)


def _decode_on_mesh(plan, graphdef, state, ids, canvas_mask, key, seeds, uniforms, cfg) -> DecodeResult:
    state = plan.shard_state(state)
    fn = mesh_decoder(plan, graphdef, state, cfg, with_mask=canvas_mask is not None,
                      with_uniforms=uniforms is not None)
    return fn(state, plan.shard_batch(ids), None if canvas_mask is None else plan.shard_batch(canvas_mask), key,
              plan.shard_batch(seeds), uniforms)


@jax.tree_util.register_dataclass
@dataclass
class Rows:
    """What the loop knows about each row besides its canvas (constant while the row decodes its prompt)."""

    keys: jax.Array  # [B] PRNG keys: the run's key folded with the row's seed
    length: jax.Array  # [B] float32 real (non-pad) tokens on the row's canvas: the timestep's denominator
    mask: jax.Array | None  # [B, P+G] int32 key-padding mask (None: attend everywhere, the original)


@jax.tree_util.register_dataclass
@dataclass
class LoopState:
    """The decoding loop's carry."""

    x: jax.Array  # [B, P+G] int32 canvas
    block: jax.Array  # [B] int32 each row's current block (num_blocks once done; all equal under sync)
    step_in_block: jax.Array  # [B] int32 iterations since the row's block began
    block_n: jax.Array  # [B] int32 MASKs in the row's block when it began (the fixed schedule's n)
    nfe: jax.Array  # [B] int32 forwards in which the row was decoding
    eq: jax.Array  # [B] float32 the row's forwards weighted by FLOPs (in exact iterations)
    it: jax.Array  # [] int32 batch iterations
    traj: Trajectory | None  # [cap, B, P+G] records (return_trajectory only)
    cache: kv_cache.DecodeCache | None  # cache="prefix" | "dual" only


@partial(jax.jit, static_argnums=(0, 7))
def _decode(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, cfg: DecodeConfig) -> DecodeResult:
    return _decode_impl(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, cfg=cfg)


def _decode_impl(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, *, cfg: DecodeConfig):
    mcfg = graphdef_config(graphdef, state)
    if cfg.layer_loop == "unrolled":
        graphdef, state = unstacked_layers(graphdef, state)
    b, p = prompt_ids.shape
    x = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((b, cfg.gen_length), mcfg.mask_token_id, jnp.int32)],
                        axis=1)
    rows = _rows(key, row_seeds, canvas_mask, x.shape[1])
    st = _initial_state(graphdef, state, x, rows, p, cfg)
    st = _run(graphdef, state, st, rows, uniforms, p, cfg, until_a_row_is_done=False)
    return DecodeResult(tokens=st.x, nfe=st.nfe, iterations=st.it, equivalent_forwards=st.eq, prompt_length=p,
                        trajectory=st.traj)


def unstacked_layers(graphdef, state):
    """(graphdef, state) of the model with one parameter buffer per layer (``layer_loop="unrolled"``): made once
    per call, outside the iteration loop, so each iteration reads every weight in place."""
    model = nnx.merge(graphdef, state)
    model.backbone.blocks.unstack()
    model.planner.blocks.unstack()
    return nnx.split(model)


def _rows(key, row_seeds, canvas_mask, length: int) -> Rows:
    b = row_seeds.shape[0]
    row_len = canvas_mask.sum(-1) if canvas_mask is not None else jnp.full((b,), length)
    return Rows(keys=jax.vmap(lambda s: jax.random.fold_in(key, s))(row_seeds), length=row_len.astype(jnp.float32),
                mask=canvas_mask)


def _initial_state(graphdef, state, x, rows: Rows, p: int, cfg: DecodeConfig) -> LoopState:
    mcfg = graphdef_config(graphdef, state)
    b, length = x.shape
    cap = cfg.iteration_cap
    traj = None
    if cfg.return_trajectory:
        traj = Trajectory(reveal=jnp.zeros((cap, b, length), bool), proposals=jnp.zeros((cap, b, length), jnp.int32),
                          logps=jnp.zeros((cap, b, length), jnp.float32), num_steps=jnp.int32(0))
    cache = None
    if cfg.cache != "none":
        def fill():
            model = nnx.merge(graphdef, state)
            return _full_forward(model, x, rows, jnp.full((b,), p, jnp.int32), cfg, x == mcfg.mask_token_id,
                                 jnp.zeros((b,), jnp.float32))[2]

        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fill))
    zeros = jnp.zeros((b,), jnp.int32)
    block = _next_block(x, zeros, p, mcfg.mask_token_id, cfg)
    return LoopState(x=x, block=block, step_in_block=zeros, block_n=jnp.full((b,), cfg.block_length, jnp.int32),
                     nfe=zeros, eq=jnp.zeros((b,), jnp.float32), it=jnp.int32(0), traj=traj, cache=cache)


def _next_block(x, block, p: int, mask_id: int, cfg: DecodeConfig) -> jax.Array:
    """Each row's first block >= its ``block`` that still has a MASK (num_blocks if none): in the row itself
    (``per_row``) or in any row of the batch (``sync``, the same index for every row)."""
    b = x.shape[0]
    nb, bl = cfg.num_blocks, cfg.block_length
    has = jnp.any((x[:, p:] == mask_id).reshape(b, nb, bl), axis=2)  # [B, nb]
    if cfg.schedule == "sync":
        has = jnp.broadcast_to(has.any(0, keepdims=True), has.shape)
    ok = has & (jnp.arange(nb) >= block[:, None])
    return jnp.where(ok.any(-1), jnp.argmax(ok, axis=-1), nb).astype(jnp.int32)


def _row_done(st: LoopState, cfg: DecodeConfig) -> jax.Array:
    """[B] rows with nothing left to decode (under per_row the iteration cap applies per row)."""
    done = st.block >= cfg.num_blocks
    return done | (st.nfe >= cfg.iteration_cap) if cfg.schedule == "per_row" else done


def _full_forward(model: DUltra, x, rows: Rows, start, cfg: DecodeConfig, mask_index, timestep):
    """Exact iteration over the whole canvas: (block states [B, bl, D], planner block logits or None, the
    K/V of every backbone and head layer when caching, else None)."""
    b, length = x.shape
    positions, kmask = positions_and_mask(b, length, rows.mask)
    cols = ps.block_columns(start, cfg.block_length)
    want_kv = cfg.cache != "none"
    out = model.backbone.hidden_states(x, positions, kmask, return_kv=want_kv)
    hidden, bkv = out if want_kv else (out, None)
    plan, hkv = None, None
    if cfg.strategy == "planner":
        out = model.planner(hidden, timestep, mask_index, positions, kmask, query=cols, return_kv=want_kv)
        plan, hkv = out if want_kv else (out, None)
    cache = kv_cache.DecodeCache(backbone=bkv, head=hkv) if want_kv else None
    return ps.take_block(hidden, cols), plan, cache


def _window_forward(model: DUltra, x, rows: Rows, start: jax.Array | int, width: int, cfg: DecodeConfig,
                    mask_index, timestep, cache: kv_cache.DecodeCache, fresh: jax.Array | None = None):
    """Cached iteration: backbone and head on canvas columns [start, start + width) over the cached K/V; the
    block is the window's first block_length positions. With ``fresh`` (a column of the window, [B]) the block
    is the block_length positions from ``fresh`` on, and the window's columns before it read the cache
    (:class:`WindowStart`): what a window starting at ``fresh`` computes, at a static width."""
    b, length = x.shape
    bl = cfg.block_length
    positions, kmask = positions_and_mask(b, length, rows.mask)
    win = lambda a: jax.lax.dynamic_slice_in_dim(a, start, width, axis=1)  # noqa: E731
    pos_w = win(positions)
    span = start if fresh is None else WindowStart(window=start, fresh=fresh)
    hidden = model.backbone.hidden_states(win(x), pos_w, kmask, cache.backbone, span)
    if fresh is None:
        # the block is the window's first bl positions: a slice (none when the window is the block), no gather
        query, block = (None if width == bl else bl), hidden[:, :bl]
    else:
        off = (fresh - start).reshape(b, 1)
        query = off + jnp.arange(bl, dtype=jnp.int32)
        block = take_positions(hidden, query)
    plan = None
    if cfg.strategy == "planner":
        plan = model.planner(hidden, timestep, win(mask_index), pos_w, kmask, query=query, cache=cache.head,
                             start=span)
    return block, plan


def _cached_window(model: DUltra, x, rows: Rows, start, blk, cfg: DecodeConfig, mask_index, timestep,
                   cache: kv_cache.DecodeCache, p: int):
    """A cached iteration of block ``blk`` (a scalar) starting at column ``start``: dual's window is the block,
    prefix's everything from it on (one static width per block, chosen with ``lax.switch``). Under ``per_row``
    (vmapped over rows, where a switch would run every branch) prefix's window is block 0's for every block,
    the row's finished blocks in it read from the cache: the same result at one static width."""
    g, bl, nb = cfg.gen_length, cfg.block_length, cfg.num_blocks
    if cfg.cache == "dual":
        return _window_forward(model, x, rows, start, bl, cfg, mask_index, timestep, cache)
    if cfg.schedule == "per_row":
        w_start, width = kv_cache.window_start_width("prefix", p, g, bl, 0)
        fresh = jnp.broadcast_to(start, (x.shape[0],))
        return _window_forward(model, x, rows, w_start, width, cfg, mask_index, timestep, cache, fresh=fresh)

    def branch(i):
        w_start, width = kv_cache.window_start_width("prefix", p, g, bl, i)
        return lambda x, cache: _window_forward(model, x, rows, w_start, width, cfg, mask_index, timestep, cache)

    return jax.lax.switch(blk, [branch(i) for i in range(nb)], x, cache)


def _per_row_cached(model: DUltra, x, rows: Rows, start, blk, refresh, cfg: DecodeConfig, mask_index, timestep,
                    cache: kv_cache.DecodeCache, p: int, n_refresh: int):
    """One per_row iteration with a cache: the rows in ``refresh`` [B] (at most ``n_refresh``) are gathered into a
    sub-batch, given the exact forward, and their K/V scattered into the cache; every row then runs its own
    cached window (vmapped over rows, each at its own block), whose result the refreshed rows replace by their
    exact one. -> (block states [B, bl, D], planner logits [B, bl] or None, the cache)."""
    b = x.shape[0]
    idx = jnp.argsort(~refresh, stable=True)[:n_refresh]  # the refreshing rows first, in row order
    target = jnp.where(refresh[idx], idx, b)  # b: not a refreshing row, dropped by the scatters

    def fresh(cache):
        sub = Rows(keys=rows.keys[idx], length=rows.length[idx], mask=None if rows.mask is None else rows.mask[idx])
        h, plan, kv = _full_forward(model, x[idx], sub, start[idx], cfg, mask_index[idx], timestep[idx])
        cache = jax.tree.map(lambda c, n: c.at[:, target].set(n.astype(c.dtype), mode="drop"), cache, kv)
        return h, plan, cache

    def skip(cache):
        shapes = jax.eval_shape(fresh, cache)[:2]
        return (*jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), cache)

    h_new, plan_new, cache = jax.lax.cond(refresh.any(), fresh, skip, cache)

    h_win, plan_win = _per_row_windows(model, x, rows, start, blk, cfg, mask_index, timestep, cache, p)
    put = lambda new, win: win.at[target].set(new.astype(win.dtype), mode="drop")  # noqa: E731
    h_blk = put(h_new, h_win)
    plan_blk = None if plan_win is None else put(plan_new, plan_win)
    return h_blk, plan_blk, cache


def _per_row_windows(model: DUltra, x, rows: Rows, start, blk, cfg: DecodeConfig, mask_index, timestep,
                     cache: kv_cache.DecodeCache, p: int):
    """Every row's cached iteration at its own block (``start``, ``blk`` [B]): :func:`_cached_window` vmapped
    over rows, each a batch of one. -> (block states [B, bl, D], planner logits [B, bl] or None)."""
    def one_row(x1, keys1, len1, mask1, start1, blk1, mi1, ts1, cache1):
        rows1 = Rows(keys=keys1[None], length=len1[None], mask=None if mask1 is None else mask1[None])
        cache1 = jax.tree.map(lambda a: a[:, None], cache1)
        h, plan = _cached_window(model, x1[None], rows1, start1, blk1, cfg, mi1[None], ts1[None], cache1, p)
        return h[0], None if plan is None else plan[0]

    return jax.vmap(one_row, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 1))(
        x, rows.keys, rows.length, rows.mask, start, blk, mask_index, timestep, cache)


def _suffix_refresh(model: DUltra, x, rows: Rows, block: int, p: int, cfg: DecodeConfig, mask_index, timestep,
                    cache: kv_cache.DecodeCache):
    """``refresh="suffix"`` at the first iteration of ``block`` >= 1: backbone and head over [the previous block
    onward] (:func:`kv_cache.suffix_window`) attending to the cache before it, whose fresh K/V replace the
    cache's there. Returns what :func:`_full_forward` does."""
    b, length = x.shape
    bl = cfg.block_length
    start, width = kv_cache.suffix_window(p, cfg.gen_length, bl, block)
    positions, kmask = positions_and_mask(b, length, rows.mask)
    win = lambda a: jax.lax.dynamic_slice_in_dim(a, start, width, axis=1)  # noqa: E731
    pos_w = win(positions)
    hidden, bkv = model.backbone.hidden_states(win(x), pos_w, kmask, cache.backbone, start, return_kv=True)
    off = p + block * bl - start  # the current block's offset in the window (bl)
    plan, hkv = None, cache.head
    if cfg.strategy == "planner":
        query = jnp.broadcast_to(jnp.arange(off, off + bl, dtype=jnp.int32), (b, bl))
        plan, hkv = model.planner(hidden, timestep, win(mask_index), pos_w, kmask, query=query, cache=cache.head,
                                  start=start, return_kv=True)
        hkv = kv_cache.write_window(cache.head, hkv, start)
    new = kv_cache.DecodeCache(backbone=kv_cache.write_window(cache.backbone, bkv, start), head=hkv)
    return hidden[:, off:off + bl], plan, new


def _cost_table(mcfg, p: int, cfg: DecodeConfig) -> tuple[jax.Array, jax.Array]:
    """([nb] cost of a block's first (refresh) iteration, [nb] cost of a cached iteration of each block), in
    exact iterations of the same strategy: 1 for a full forward, else the FLOP fraction of what the window
    computes (backbone, LM head and, for the planner, its head)."""
    g, bl, nb = cfg.gen_length, cfg.block_length, cfg.num_blocks
    length = p + g
    planner = cfg.strategy == "planner"
    if cfg.cache == "none":
        return jnp.ones((nb,), jnp.float32), jnp.ones((nb,), jnp.float32)
    full = iteration_cost(mcfg, length, length, bl, planner)
    frac = lambda w: iteration_cost(mcfg, length, w, bl, planner) / full  # noqa: E731
    widths = [kv_cache.window_start_width(cfg.cache, p, g, bl, i)[1] for i in range(nb)]
    refresh = [1.0] * nb
    if cfg.refresh == "suffix":
        refresh = [1.0] + [frac(kv_cache.suffix_window(p, g, bl, i)[1]) for i in range(1, nb)]
    return jnp.asarray(refresh, jnp.float32), jnp.asarray([frac(w) for w in widths], jnp.float32)


def _run(graphdef, params, st: LoopState, rows: Rows, uniforms, p: int, cfg: DecodeConfig, *,
         until_a_row_is_done: bool, until_it: jax.Array | None = None) -> LoopState:
    """Iterate until every row is done (or the batch cap under sync); ``until_a_row_is_done`` stops as soon as
    some row is done as well, so a host can refill its slot (continuous batching; rows already done on entry
    must have ``nfe`` = 0, block = num_blocks: empty slots); ``until_it`` stops at that batch iteration too
    (a bounded segment, so a streaming host sees progress)."""
    mcfg = graphdef_config(graphdef, params)
    mask_id = mcfg.mask_token_id
    b, length = st.x.shape
    bl, nb = cfg.block_length, cfg.num_blocks
    cap = cfg.iteration_cap
    exclude = mask_id if cfg.excludes_mask else None
    stop_id = cfg.stop_id if cfg.stop_id is not None else mcfg.eos_token_id
    if cfg.early_stop and stop_id is None:
        raise ValueError("early_stop needs an end-of-text id: the model config has no eos_token_id; pass stop_id")
    stop_ids = jnp.asarray([stop_id if stop_id is not None else -1], jnp.int32)
    refresh_cost, cached_cost = _cost_table(mcfg, p, cfg)
    row_ids = jnp.arange(b)[:, None]
    n_refresh = min(b, cfg.refresh_rows or max(1, -(-b // 4)))
    reveal_rule = rule_of(cfg, p, uniforms)

    def body(carry):
        st, params = carry
        model: DUltra = nnx.merge(graphdef, params)
        blk = jnp.minimum(st.block, nb - 1)
        start = p + blk * bl
        cols = ps.block_columns(start, bl)
        x_blk = ps.take_block(st.x, cols)
        cand = (x_blk == mask_id) & ~_row_done(st, cfg)[:, None]
        active = cand.any(-1)
        timestep, mask_index = ps.step_inputs(st.x, cols, mask_id, rows.length)
        cache = st.cache
        waiting = jnp.zeros((b,), bool)
        if cfg.cache == "none":
            full_forward = jnp.bool_(True)
            h_blk, plan_blk, _ = _full_forward(model, st.x, rows, start, cfg, mask_index, timestep)
        elif cfg.schedule == "per_row":
            # each row refreshes its cache when IT starts a block: up to refresh_rows of them per iteration
            need = (st.step_in_block == 0) & ~_row_done(st, cfg)
            full_forward = need & (jnp.cumsum(need) <= n_refresh)
            waiting = need & ~full_forward
            cand = cand & ~waiting[:, None]
            active = cand.any(-1)
            h_blk, plan_blk, cache = _per_row_cached(model, st.x, rows, start, blk, full_forward, cfg, mask_index,
                                                     timestep, cache, p, n_refresh)
        else:
            # first iteration of a block (sync: the same for every row): exact forward that refreshes the
            # cache; later ones: the window only
            full_forward = st.step_in_block[0] == 0
            s0 = start[0]

            def refresh(ops):
                x, cache = ops
                if cfg.refresh == "full":
                    return _full_forward(model, x, rows, start, cfg, mask_index, timestep)
                return _refresh_by_policy(model, x, rows, start, blk[0], st.it, p, cfg, mask_index, timestep, cache)

            def reuse(ops):
                x, cache = ops
                return (*_cached_window(model, x, rows, s0, blk[0], cfg, mask_index, timestep, cache, p), cache)

            h_blk, plan_blk, cache = jax.lax.cond(full_forward, refresh, reuse, (st.x, st.cache))
        logits = model.lm_logits(h_blk)
        step_keys = jax.vmap(lambda k, n: jax.random.fold_in(k, n))(rows.keys, st.nfe)
        if cfg.temperature > 0:
            gumbel_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(step_keys)
            x0, flogits = rules.propose_tokens(logits, cfg.temperature, exclude, gumbel_keys)
        else:
            x0, flogits = rules.propose_tokens(logits, 0.0, exclude, None)
        reveal, step_logps = reveal_rule(BlockStep(
            proposals=x0, logits=flogits, cand=cand, plan=plan_blk, keys=step_keys, cols=cols, it=st.it,
            block_n=st.block_n, step_in_block=st.step_in_block))
        new_blk = jnp.where(reveal, x0, x_blk)
        x_new = st.x.at[row_ids, cols].set(new_blk)
        if cfg.early_stop:
            x_new = _early_stop(x_new, p, mask_id, stop_ids)
        traj = st.traj
        if traj is not None:
            full = lambda a, fill: fill.at[row_ids, cols].set(a)  # noqa: E731
            traj = Trajectory(
                reveal=traj.reveal.at[st.it].set(full(reveal, jnp.zeros((b, length), bool))),
                proposals=traj.proposals.at[st.it].set(full(x0, x_new)),
                logps=traj.logps if step_logps is None else traj.logps.at[st.it].set(
                    full(step_logps, jnp.zeros((b, length), jnp.float32))),
                num_steps=st.it + 1,
            )
        nfe = st.nfe + active.astype(jnp.int32)
        eq = st.eq + active * jnp.where(full_forward, refresh_cost[blk], cached_cost[blk])
        nxt = jnp.where(st.block >= nb, nb, _next_block(x_new, st.block, p, mask_id, cfg))
        moved = nxt != st.block
        nxt_cols = ps.block_columns(p + jnp.minimum(nxt, nb - 1) * bl, bl)
        nxt_n = (ps.take_block(x_new, nxt_cols) == mask_id).sum(-1).astype(jnp.int32)
        if cfg.on_block is not None:
            finished = moved & (st.block < nb)
            jax.lax.cond(finished.any(), lambda: jax.debug.callback(cfg.on_block, finished, st.block, nxt,
                                                                     x_new[:, p:]), lambda: None)
        new = LoopState(x=x_new, block=nxt, step_in_block=jnp.where(moved, 0, st.step_in_block + ~waiting),
                        block_n=jnp.where(moved, nxt_n, st.block_n), nfe=nfe, eq=eq, it=st.it + 1, traj=traj,
                        cache=cache)
        return new, params

    def cond(carry):
        st = carry[0]
        # sync: the batch's block and the batch cap; per_row: any row left (each row has its own cap)
        go = (st.block[0] < nb) & (st.it < cap) if cfg.schedule == "sync" else jnp.any(~_row_done(st, cfg))
        if until_a_row_is_done:
            go = go & ~jnp.any(_row_done(st, cfg) & (st.nfe > 0))
        if until_it is not None:
            go = go & (st.it < until_it)
        return go

    # The parameters ride in the carry (unchanged, aliased by XLA) so NNX sees them at the loop body's trace level.
    return jax.lax.while_loop(cond, body, (st, params))[0]


def _refresh_by_policy(model: DUltra, x, rows: Rows, start, blk, it, p: int, cfg: DecodeConfig, mask_index,
                       timestep, cache):
    """A block's first iteration under a refresh policy other than "full": the run's first iteration is always a
    full forward (the cache is empty); ``suffix`` then recomputes from the previous block onward."""
    nb = cfg.num_blocks

    def full(x, cache):
        return _full_forward(model, x, rows, start, cfg, mask_index, timestep)

    def suffix(i):
        return lambda x, cache: _suffix_refresh(model, x, rows, i, p, cfg, mask_index, timestep, cache)

    branches = [full] + [suffix(i) for i in range(1, nb)]
    return jax.lax.switch(jnp.where(it == 0, 0, blk), branches, x, cache)


def graphdef_config(graphdef, state):
    """The ModelConfig of a split model (a static attribute, so merging costs nothing at trace time)."""
    return nnx.merge(graphdef, state).cfg


def _early_stop(x: jax.Array, p: int, mask_id: int, stop_ids: jax.Array) -> jax.Array:
    """Fill the remaining MASKs of rows whose generation has an end-of-text before its first MASK."""
    gen = x[:, p:]
    masked = gen == mask_id
    idx = jnp.arange(gen.shape[1])
    first_mask = jnp.where(masked.any(-1), jnp.argmax(masked, axis=-1), gen.shape[1])
    is_stop = jnp.isin(gen, stop_ids)
    done = jnp.any(is_stop & (idx < first_mask[:, None]), axis=-1)
    fill = stop_ids[0]
    gen = jnp.where(done[:, None] & masked, fill, gen)
    return x.at[:, p:].set(gen)
