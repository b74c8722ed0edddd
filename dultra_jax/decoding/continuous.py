"""Continuous batching of a known list of prompts: :func:`generate_many`, a driver over
:class:`dultra_jax.decoding.engine.DecodeEngine`.

The prompts are submitted shortest first (so the engine's shared prompt width only grows), at the widths
:func:`merge_widths` picks for them (few widths: few compiles; merged by the padded canvas positions they
cost, not by prompt counts). Each prompt's result equals ``generate(model, [prompt], row_seeds=[its seed],
...)`` of it alone (the seed: ``row_seeds[i]``, default the prompt's index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import numpy as np

from dultra_jax.decoding import loop
from dultra_jax.decoding.engine import DecodeEngine, bucket_width, merge_widths
from dultra_jax.model.dultra import DUltra

__all__ = ["ManyResult", "bucket_width", "generate_many", "merge_widths"]

_NOT_HERE = ("return_trajectory", "uniforms", "attention_mask", "pad_aware", "schedule", "on_block")


@dataclass
class ManyResult:
    """Results of :func:`generate_many`, in the input order of the prompts."""

    tokens: list[np.ndarray]  # N x [len(prompt) + gen_length] int32: the prompt's ids, then the generated ids
    nfe: np.ndarray  # [N] int32 forwards each prompt was decoding in
    equivalent_forwards: np.ndarray  # [N] float32 its FLOP-weighted forwards (see DecodeResult)
    iterations: int  # batch iterations (loop forwards) in total, over all buckets
    prompt_lengths: np.ndarray  # [N] int32
    widths: np.ndarray  # [N] int32 the padded prompt width each prompt was decoded at (its length bucket)
    timing: dict = field(default_factory=dict)  # the engine's segments, segment_s, host_s

    def generated(self, i: int) -> np.ndarray:
        """The generated ids of prompt ``i``."""
        return self.tokens[i][int(self.prompt_lengths[i]):]


def generate_many(model: DUltra, prompts, *, slots: int, rng: jax.Array | int | None = None,
                  row_seeds=None, plan=None, **generate_kwargs) -> ManyResult:
    """Decode every prompt of ``prompts`` (a list of 1-D id sequences) through ``slots`` rows.

    ``generate_kwargs`` are :func:`dultra_jax.decoding.generate`'s (``gen_length``, ``block_length``,
    ``strategy``, ``temperature``, ``cache``, ``early_stop``, ...), except the per-batch ones (attention is
    padding-aware). ``row_seeds`` [N] key each prompt's randomness (default: its index), so prompt i's result
    equals ``generate(model, [prompt], row_seeds=[row_seeds[i]], ...)``. ``plan`` (a
    :class:`dultra_jax.parallel.ShardingPlan`) splits the slots over its data axes (rounded up to a multiple of
    its batch shards). Returns a :class:`ManyResult`.
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
    cfg = loop.decode_config(**generate_kwargs)
    lengths = [len(r) for r in rows]
    n_slots = min(slots, len(rows))
    if plan is not None:
        n_slots = -(-n_slots // plan.batch_shards) * plan.batch_shards
    engine = DecodeEngine(model, cfg, slots=n_slots, rng=rng, plan=plan,
                          widths=merge_widths(lengths, cfg.gen_length))
    handle_of = {}
    for i in sorted(range(len(rows)), key=lambda i: lengths[i]):
        handle_of[engine.submit(rows[i], seed=seeds[i])] = i
    out = engine.run()
    tokens: list[np.ndarray | None] = [None] * len(rows)
    nfe = np.zeros(len(rows), np.int32)
    eq = np.zeros(len(rows), np.float32)
    widths = np.zeros(len(rows), np.int32)
    for f in out:
        i = handle_of[f.handle]
        tokens[i], nfe[i], eq[i], widths[i] = f.tokens, f.nfe, f.equivalent_forwards, f.width
    return ManyResult(tokens=tokens, nfe=nfe, equivalent_forwards=eq, iterations=engine.iterations,
                      prompt_lengths=np.asarray(lengths, np.int32), widths=widths,
                      timing=dict(segments=engine.segments, segment_s=engine.segment_s, host_s=engine.host_s))

