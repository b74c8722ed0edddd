"""The eval's decode drivers: prompts -> completions in padding-correct batches, timed without compilation.

Batching is padding-correct: prompts are left-padded and attention ignores the pads, and every row's
randomness is keyed by its problem's index, so a problem's completion does not depend on the batch it lands
in (batch 1 reproduces any row). Prompts are sorted by length (less padding) and padded up to a multiple of
``pad_multiple`` tokens, so a whole evaluation compiles the decoding loop only a few times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dultra_jax import accounting
from dultra_jax.eval.settings import EvalError, EvalSettings


@dataclass
class DecodeRun:
    """Decoded prompts (input order) and the decode calls that produced them."""

    samples: list[dict[str, Any]]  # ids, nfe, equivalent_forwards, effective_tokens, masks_left, time_s, batch_rows
    batches: list[dict[str, Any]]  # rows (real), width, time_s, iterations, effective_tokens
    compile_s: float = 0.0
    widths: list[int] = field(default_factory=list)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def decode_prompts(model, prompts: Sequence[Sequence[int]], settings: EvalSettings, *, seed: int = 0,
                   row_seeds: Sequence[int] | None = None, exclude: Sequence[int] = (), progress: bool = False,
                   desc: str = "decode", max_iterations: int | None = None,
                   compiled: set[tuple[int, int]] | None = None, plan=None, warmup: bool = True,
                   on_batch: Callable[[list[int], list[dict[str, Any]], dict[str, Any]], None] | None = None
                   ) -> DecodeRun:
    """Decode every prompt in batches of ``settings.batch_size`` (left-padded, pad-aware attention).

    With ``warmup`` each new (batch, width) shape is compiled and run once untimed first, so ``time_s`` is
    decoding only. ``row_seeds`` (default: the prompt's position) key each row's randomness. ``compiled``
    carries the shapes already warmed up across calls with the same settings (e.g. the seeds of one run).
    ``plan`` (a :class:`~dultra_jax.parallel.ShardingPlan`) splits each batch's rows over its mesh; the batch is
    rounded up to a multiple of its batch shards. ``on_batch(positions, samples, batch)`` is called as each
    decode call finishes (the harness appends its rows to ``samples.jsonl`` there).

    This is the one function that decodes: with ``settings.batching == "continuous"`` it runs
    :func:`dultra_jax.decoding.generate_many` (:func:`_decode_continuous`), otherwise sync batches of
    ``generate``; callers see the same samples and ``on_batch`` calls either way.
    """
    import jax
    from tqdm.auto import tqdm

    from dultra_jax.decoding import generate

    cfg = model.cfg
    n = len(prompts)
    if n == 0:
        raise EvalError("no prompts to decode")
    g = settings.decode.gen_length
    seeds = np.arange(n) if row_seeds is None else np.asarray(row_seeds, np.int64)
    if seeds.shape != (n,):
        raise EvalError(f"row_seeds must have one seed per prompt ({n}), got shape {seeds.shape}")
    lengths = [len(p) for p in prompts]
    max_prompt = cfg.max_sequence_length - g
    for i, ln in enumerate(lengths):
        if ln == 0:
            raise EvalError(f"prompt {i} is empty")
        if ln > max_prompt:
            raise EvalError(f"prompt {i} has {ln} tokens: with gen_length {g} it exceeds the model's "
                            f"max_sequence_length {cfg.max_sequence_length}")
    if settings.batching == "continuous":
        return _decode_continuous(model, prompts, settings, seed=seed, seeds=seeds, exclude=exclude,
                                  progress=progress, desc=desc, max_iterations=max_iterations, compiled=compiled,
                                  warmup=warmup, on_batch=on_batch, plan=plan)
    from dultra_jax.decoding.loop import pad_id_of, pad_prompts

    pad_id = pad_id_of(cfg)
    b = min(settings.batch_size, n)
    if plan is not None:
        b = _round_up(b, plan.batch_shards)
    order = sorted(range(n), key=lambda i: lengths[i])
    kw = dict(settings.decode_kwargs(), rng=seed, pad_aware=True, max_iterations=max_iterations)
    samples: list[dict[str, Any] | None] = [None] * n
    batches: list[dict[str, Any]] = []
    compiled = set() if compiled is None else compiled
    compile_s = 0.0
    widths: set[int] = set()
    for start in tqdm(range(0, n, b), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + b]
        # A short last batch is filled with copies of its last row: same prompt and seed decode identically, so
        # the copies add no iterations (blocks are batch-synchronous); they are dropped.
        rows = idx + [idx[-1]] * (b - len(idx))
        width = min(_round_up(max(lengths[i] for i in idx), settings.pad_multiple), max_prompt)
        widths.add(width)
        ids, mask = pad_prompts([prompts[i] for i in rows], pad_id, width)
        call = dict(kw, attention_mask=mask, row_seeds=seeds[rows].astype(np.int32))
        if plan is not None:
            call["plan"] = plan
        try:
            if warmup and (b, width) not in compiled:
                t0 = time.perf_counter()
                jax.block_until_ready(generate(model, ids, **call).tokens)
                compile_s += time.perf_counter() - t0
                compiled.add((b, width))
            t0 = time.perf_counter()
            result = generate(model, ids, **call)
            gen = np.asarray(jax.device_get(result.generated))
            nfe = np.asarray(jax.device_get(result.nfe))
            dt = time.perf_counter() - t0
        except ValueError as e:
            raise EvalError(str(e)) from e
        _record_call(idx, gen, nfe, np.asarray(result.equivalent_forwards), [width] * len(idx), dt,
                     batch_rows=len(idx), iterations=int(result.iterations), exclude=exclude,
                     mask_id=cfg.mask_token_id, samples=samples, batches=batches, on_batch=on_batch)
    return DecodeRun(samples=samples, batches=batches, compile_s=compile_s, widths=sorted(widths))


def _decode_continuous(model, prompts, settings: EvalSettings, *, seed, seeds, exclude, progress, desc,
                       max_iterations, compiled, warmup, on_batch, plan=None) -> DecodeRun:
    """:func:`decode_prompts` through :func:`dultra_jax.decoding.generate_many` with ``batch_size`` slots, in
    chunks of prompts of similar length (``CONTINUOUS_CHUNK`` x slots), so that finished rows reach
    ``on_batch`` (and ``samples.jsonl``) as each chunk ends. Each prompt's result is the one it gets alone."""
    import jax
    from tqdm.auto import tqdm

    from dultra_jax.decoding import generate_many

    cfg = model.cfg
    n = len(prompts)
    slots = min(settings.batch_size, n)
    lengths = [len(p) for p in prompts]
    order = sorted(range(n), key=lambda i: lengths[i])
    kw = dict(settings.decode_kwargs(), rng=seed, max_iterations=max_iterations)
    chunk = CONTINUOUS_CHUNK * slots
    samples: list[dict[str, Any] | None] = [None] * n
    batches: list[dict[str, Any]] = []
    compiled = set() if compiled is None else compiled
    compile_s = 0.0
    widths: set[int] = set()
    for start in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + chunk]
        part = [prompts[i] for i in idx]
        call = dict(kw, slots=min(slots, len(idx)), row_seeds=seeds[idx].astype(np.int64), plan=plan)
        try:
            shape = ("continuous", call["slots"], max(lengths[i] for i in idx))
            if warmup and shape not in compiled:  # compile (and run once) untimed, as the batched path does
                t0 = time.perf_counter()
                generate_many(model, part, **call)
                compile_s += time.perf_counter() - t0
                compiled.add(shape)
            t0 = time.perf_counter()
            res = generate_many(model, part, **call)
            dt = time.perf_counter() - t0
        except ValueError as e:
            raise EvalError(str(e)) from e
        gen = np.stack([np.asarray(jax.device_get(res.generated(j))) for j in range(len(idx))])
        widths.update(int(w) for w in res.widths)
        _record_call(idx, gen, res.nfe, res.equivalent_forwards, [int(w) for w in res.widths], dt,
                     batch_rows=call["slots"], iterations=int(res.iterations), exclude=exclude,
                     mask_id=cfg.mask_token_id, samples=samples, batches=batches, on_batch=on_batch,
                     slots=call["slots"])
    return DecodeRun(samples=samples, batches=batches, compile_s=compile_s, widths=sorted(widths))


def _record_call(idx, gen, nfe, eq, row_widths, dt, *, batch_rows, iterations, exclude, mask_id, samples, batches,
                 on_batch, **batch_extra) -> None:
    """One decode call's results: the samples of its prompts ``idx`` (the first ``len(idx)`` rows of ``gen``,
    ``nfe``, ``eq``; rows after them are fill-ups), its ``batches`` entry, and the ``on_batch`` call."""
    n = len(idx)
    counted = accounting.account(np.asarray(gen)[:n], np.asarray(nfe)[:n], exclude, mask_id)
    eff = counted.effective_tokens
    for r, i in enumerate(idx):
        samples[i] = {"ids": gen[r], "nfe": int(nfe[r]), "equivalent_forwards": float(eq[r]),
                      "effective_tokens": int(eff[r]), "masks_left": int(counted.masks_left[r]),
                      "time_s": dt, "batch_rows": batch_rows, "width": int(row_widths[r])}
    batch = {"rows": n, "width": max(row_widths), "time_s": dt, "iterations": iterations,
             "effective_tokens": int(eff.sum()), **batch_extra}
    batches.append(batch)
    if on_batch is not None:
        on_batch(list(idx), [samples[i] for i in idx], batch)


CONTINUOUS_CHUNK = 16  # prompts per generate_many call, in slots: results are appended to the log per call
