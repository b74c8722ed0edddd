"""One compiled decoding loop for every reveal rule: ``lax.while_loop`` over iterations on a fixed canvas.

Canvas [B, P+G] = [left-padded prompt | MASK x G], decoded block by block (semi-autoregressively). Each
iteration: one backbone forward over the whole canvas, LM-head logits and token proposals for the current
block only (the original computes them everywhere and uses only the block: restricting is exact), a reveal
rule, and the update. Blocks are batch-synchronous, as in the original: a row that has finished the block
waits (unchanged, not counted in its NFE) until all rows have; blocks with no MASK left are skipped without a
forward.

Randomness is per row and per the row's own iteration count (its NFE so far), so a row's result does not
depend on what else is in the batch: with ``row_seeds`` a batch-1 run reproduces any row of a batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dultra_jax.decoding import kv_cache, rules
from dultra_jax.model.dultra import DUltra

Strategy = Literal["planner", "threshold", "factor", "fixed"]
STRATEGIES = ("planner", "threshold", "factor", "fixed")


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
        if self.return_trajectory and self.strategy != "planner":
            raise ValueError("return_trajectory is only defined for the planner strategy (GRPO rollouts)")

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
    """Per-iteration records for GRPO ([S, B, L], S = cap); steps >= num_steps are all-False / zero."""

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
    equivalent_forwards: jax.Array  # [B] the row's forwards weighted by FLOPs relative to a full forward
    prompt_length: int = dataclasses.field(metadata=dict(static=True))
    trajectory: Trajectory | None = None

    @property
    def generated(self) -> jax.Array:
        return self.tokens[:, self.prompt_length:]


# ------------------------------------------------------------------------------------------ inputs
def pad_prompts(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad a list of 1-D id sequences (or pass through a [B, P] array) -> (ids, 0/1 mask)."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        ids = np.asarray(prompts)
        if ids.shape[1] == 0:
            raise ValueError("prompt_ids is empty: give at least one prompt token per row")
        return ids.astype(np.int32), np.ones(ids.shape, np.int32)
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("prompt_ids holds no prompts")
    if any(len(r) == 0 for r in rows):
        raise ValueError("prompt_ids contains an empty prompt: every row needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ the loop
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
    ``planner_temperature``, ``exclude_mask``, ``early_stop``, ``stop_id``, ``max_iterations``).
    """
    cfg = DecodeConfig(
        gen_length=gen_length, block_length=block_length, strategy=strategy, reveal=reveal,
        temperature=float(temperature), threshold=float(threshold), factor=float(factor), steps=steps,
        return_trajectory=return_trajectory, **options,
    )
    mcfg = model.cfg
    pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None else (mcfg.eos_token_id or 0)
    ids, mask = pad_prompts(prompt_ids, pad_id)
    if attention_mask is not None:
        mask = np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != prompt_ids shape {ids.shape}")
    if np.any(ids == mcfg.mask_token_id):
        raise ValueError(f"prompt_ids contain the MASK id {mcfg.mask_token_id}; prompts must be fully known")
    if np.any((ids < 0) | (ids >= mcfg.embedding_size)):
        raise ValueError(f"prompt_ids contain ids outside the vocabulary [0, {mcfg.embedding_size})")
    b, p = ids.shape
    if p + gen_length > mcfg.max_sequence_length:
        raise ValueError(
            f"prompt length {p} + gen_length {gen_length} exceeds the model's max_sequence_length "
            f"{mcfg.max_sequence_length}"
        )
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
        uniforms = jnp.asarray(uniforms, jnp.float32)
        if uniforms.ndim != 3 or uniforms.shape[1:] != (b, p + gen_length):
            raise ValueError(f"uniforms must be [S, {b}, {p + gen_length}], got {uniforms.shape}")
    graphdef, state = nnx.split(model)
    if plan is not None:
        return _decode_on_mesh(plan, graphdef, state, ids, canvas_mask, key, seeds, uniforms, cfg)
    return _decode(graphdef, state, jnp.asarray(ids), None if canvas_mask is None else jnp.asarray(canvas_mask),
                   key, jnp.asarray(seeds), uniforms, cfg)


_MESH_DECODERS: dict = {}


def _decode_on_mesh(plan, graphdef, state, ids, canvas_mask, key, seeds, uniforms, cfg) -> DecodeResult:
    """The same loop jitted by the sharding plan: explicit shardings for parameters, rows and per-row inputs."""
    state = plan.shard_state(state)
    from dultra_jax.parallel import shardings_of

    rows2, rows1 = plan.batch_sharding(2), plan.batch_sharding(1)
    in_shardings = (shardings_of(state), rows2, None if canvas_mask is None else rows2, plan.replicated, rows1,
                    None if uniforms is None else plan.sharding([None, "activation_batch", None]))
    key_ = (id(plan), graphdef, cfg, canvas_mask is None, uniforms is None)
    if key_ not in _MESH_DECODERS:  # one compiled loop per plan, model structure and settings
        _MESH_DECODERS[key_] = (plan, plan.jit(partial(_decode_impl, graphdef, cfg=cfg), in_shardings=in_shardings))
    fn = _MESH_DECODERS[key_][1]
    return fn(state, plan.shard_batch(ids), None if canvas_mask is None else plan.shard_batch(canvas_mask), key,
              plan.shard_batch(seeds), uniforms)


@partial(jax.jit, static_argnums=(0, 7))
def _decode(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, cfg: DecodeConfig) -> DecodeResult:
    return _decode_impl(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, cfg=cfg)


def _decode_impl(graphdef, state, prompt_ids, canvas_mask, key, row_seeds, uniforms, *, cfg: DecodeConfig):
    mcfg = graphdef_config(graphdef, state)
    mask_id = mcfg.mask_token_id
    b, p = prompt_ids.shape
    g, bl, nb = cfg.gen_length, cfg.block_length, cfg.num_blocks
    length = p + g
    cap = cfg.iteration_cap
    x = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((b, g), mask_id, jnp.int32)], axis=1)
    row_len = (canvas_mask.sum(-1) if canvas_mask is not None else jnp.full((b,), length)).astype(jnp.float32)
    row_keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(row_seeds)
    exclude = mask_id if cfg.excludes_mask else None
    stop_id = cfg.stop_id if cfg.stop_id is not None else mcfg.eos_token_id
    if cfg.early_stop and stop_id is None:
        raise ValueError("early_stop needs an end-of-text id: the model config has no eos_token_id; pass stop_id")
    stop_ids = jnp.asarray([stop_id if stop_id is not None else -1], jnp.int32)

    def next_block(x, start_block):
        """First block >= start_block that still has a MASK in some row (nb if none)."""
        has = jnp.any((x[:, p:] == mask_id).reshape(b, nb, bl), axis=(0, 2))
        ok = has & (jnp.arange(nb) >= start_block)
        return jnp.where(jnp.any(ok), jnp.argmax(ok), nb).astype(jnp.int32)

    cost_weights = jnp.asarray([
        kv_cache.forward_cost(mcfg, length, kv_cache.window_start_width(cfg.cache, p, g, bl, i)[1])
        / kv_cache.forward_cost(mcfg, length, length) for i in range(nb)
    ], jnp.float32) if cfg.cache != "none" else jnp.ones((nb,), jnp.float32)

    def body(carry):
        x, blk, step_in_block, block_n, nfe, eq, it, traj, cache, params = carry
        model: DUltra = nnx.merge(graphdef, params)
        start = p + blk * bl
        x_blk = jax.lax.dynamic_slice_in_dim(x, start, bl, axis=1)
        cand = x_blk == mask_id
        active = cand.any(-1)
        full_forward = step_in_block == 0
        if cfg.cache == "none":
            hidden = model.hidden_states(x, canvas_mask)
        else:
            # first iteration of a block: exact forward that refreshes the cache; later ones: the window only
            def refresh(ops):
                return kv_cache.forward_with_kv(model, ops[0], canvas_mask)

            def reuse(ops):
                x, h, k, v = ops
                return kv_cache.cached_hidden(model, cfg.cache, x, blk, p, g, bl, h, k, v, canvas_mask), k, v

            hidden, keys, values = jax.lax.cond(full_forward, refresh, reuse, (x, *cache))
            cache = (hidden, keys, values)
        h_blk = jax.lax.dynamic_slice_in_dim(hidden, start, bl, axis=1)
        logits = model.lm_logits(h_blk)
        step_keys = jax.vmap(lambda k, n: jax.random.fold_in(k, n))(row_keys, nfe)
        if cfg.temperature > 0:
            gumbel_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(step_keys)
            x0, flogits = rules.propose_tokens(logits, cfg.temperature, exclude, gumbel_keys)
        else:
            x0, flogits = rules.propose_tokens(logits, 0.0, exclude, None)
        step_logps = None
        if cfg.strategy == "planner":
            gen_masks = (x == mask_id).sum(-1).astype(jnp.float32)
            timestep = 1.0 - gen_masks / row_len
            col = jnp.arange(length)
            mask_index = (x == mask_id) & (col >= start) & (col < start + bl)
            plan = model.planner_logits(hidden, timestep, mask_index, canvas_mask)
            plan_blk = jax.lax.dynamic_slice_in_dim(plan, start, bl, axis=1)
            prob = rules.planner_probs(plan_blk, cand, cfg.planner_temperature, cfg.factor)
            if uniforms is not None:
                u = jax.lax.dynamic_slice_in_dim(uniforms[jnp.minimum(it, uniforms.shape[0] - 1)], start, bl, axis=1)
            else:
                u_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(step_keys)
                u_gen = jax.vmap(lambda k: jax.random.uniform(k, (g,), jnp.float32))(u_keys)
                u = jax.lax.dynamic_slice_in_dim(u_gen, blk * bl, bl, axis=1)
            reveal = rules.reveal_planner(prob, cand, cfg.reveal, u)
            if cfg.return_trajectory:
                step_logps = rules.planner_step_logps(prob, cand, reveal, rules.token_logprob(flogits, x0))
        else:
            conf = rules.token_confidence(flogits, x0)
            if cfg.strategy == "threshold":
                reveal = rules.reveal_threshold(conf, cand, cfg.threshold)
            elif cfg.strategy == "factor":
                reveal = rules.reveal_factor(conf, cand, cfg.factor, cfg.factor_rule == "corrected")
            else:
                count = rules.fixed_count(block_n, step_in_block, cfg.steps_per_block)
                reveal = rules.reveal_fixed(conf, cand, count)
        new_blk = jnp.where(reveal, x0, x_blk)
        x_new = jax.lax.dynamic_update_slice_in_dim(x, new_blk, start, axis=1)
        if cfg.early_stop:
            x_new = _early_stop(x_new, p, mask_id, stop_ids)
        if traj is not None:
            full = lambda a, fill: jax.lax.dynamic_update_slice_in_dim(fill, a, start, axis=1)  # noqa: E731
            traj = Trajectory(
                reveal=traj.reveal.at[it].set(full(reveal, jnp.zeros((b, length), bool))),
                proposals=traj.proposals.at[it].set(full(x0, x_new)),
                logps=traj.logps.at[it].set(full(step_logps, jnp.zeros((b, length), jnp.float32))),
                num_steps=it + 1,
            )
        nfe = nfe + active.astype(jnp.int32)
        eq = eq + active * jnp.where(full_forward, 1.0, cost_weights[jnp.minimum(blk, nb - 1)])
        nxt = next_block(x_new, blk)
        moved = nxt != blk
        nxt_start = p + jnp.minimum(nxt, nb - 1) * bl
        nxt_n = (jax.lax.dynamic_slice_in_dim(x_new, nxt_start, bl, axis=1) == mask_id).sum(-1).astype(jnp.int32)
        block_n = jnp.where(moved, nxt_n, block_n)
        step_in_block = jnp.where(moved, 0, step_in_block + 1)
        return x_new, nxt, step_in_block, block_n, nfe, eq, it + 1, traj, cache, params

    def cond(carry):
        return (carry[1] < nb) & (carry[6] < cap)

    traj0 = None
    if cfg.return_trajectory:
        traj0 = Trajectory(
            reveal=jnp.zeros((cap, b, length), bool),
            proposals=jnp.zeros((cap, b, length), jnp.int32),
            logps=jnp.zeros((cap, b, length), jnp.float32),
            num_steps=jnp.int32(0),
        )
    blk0 = next_block(x, 0)
    # The parameters ride in the carry (unchanged, aliased by XLA) so NNX sees them at the loop body's trace level.
    cache0 = ()
    if cfg.cache != "none":
        cache0 = jax.eval_shape(lambda: kv_cache.forward_with_kv(nnx.merge(graphdef, state), x, canvas_mask))
        cache0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache0)
    carry = (x, blk0, jnp.int32(0), jnp.full((b,), bl, jnp.int32), jnp.zeros((b,), jnp.int32),
             jnp.zeros((b,), jnp.float32), jnp.int32(0), traj0, cache0, state)
    x, _, _, _, nfe, eq, iterations, traj, _, _ = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(tokens=x, nfe=nfe, iterations=iterations, equivalent_forwards=eq, prompt_length=p,
                        trajectory=traj)


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
