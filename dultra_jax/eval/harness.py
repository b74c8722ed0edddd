"""Evaluation harness: the original's eval prompts and scoring, batched padding-correct decoding, honest speed.

One run = (model, task, decoding settings, seeds). For each seed every problem is decoded once (greedy tokens
unless ``temperature`` > 0; the planner's reveals are seeded), scored as the original scores it, and recorded:

- ``samples.jsonl``: one line per (seed, problem): prompt, completion, correct, NFE, effective tokens, the wall
  time of the decode call that produced it, and the scorer's details. Appended (flushed, fsynced) as each
  batch is decoded and scored, so an interrupted run keeps its finished batches and ``resume`` continues it.
- ``summary.json``: accuracy (mean and sample std over seeds), mean NFE, TPF, positions/s and effective
  tokens/s (generated tokens only, compilation excluded), batch, prompt/gen/block lengths, settings, device,
  commit. Definitions: :mod:`dultra_jax.eval.metrics`.

Batching is padding-correct: prompts are left-padded and attention ignores the pads, and every row's
randomness is keyed by its problem's index, so a problem's completion does not depend on the batch it lands
in (batch 1 reproduces any row). Prompts are sorted by length (less padding) and padded up to a multiple of
``pad_multiple`` tokens, so a whole evaluation compiles the decoding loop only a few times. The same keying
makes data parallelism exact: a mesh splits each batch's rows over devices, and several processes split the
problems (process 0 merges), with results identical to one device.

Scoring (REFERENCE_TRAINING.md §5): GSM8K by the evaluation's numeric parse (|pred - gt| < 1e-5); MATH500 by
math-verify on the last ``\\boxed{}`` (string-normaliser fallback); HumanEval/MBPP by running the lm-eval
programs in the sandbox (pass@1); the synthetic addition task by exact match.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax import accounting
from dultra_jax.atomic import write_atomic
from dultra_jax.checkpoints.hub import parse_hub_id, resolve_model_path
from dultra_jax.checkpoints.store import recorded_task
from dultra_jax.config import ConfigError
from dultra_jax.data import synthetic
from dultra_jax.data.tasks import Example
from dultra_jax.eval import metrics
from dultra_jax.eval.env import device_name, git_commit, git_dirty
from dultra_jax.outputs import check_results_dir

EVAL_TASKS = ("gsm8k", "math500", "humaneval", "mbpp", synthetic.TASK_NAME)
SWEEP_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)
SWEEP_STRATEGIES = ("factor", "planner")
SYNTHETIC_DEFAULT_N = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class EvalError(ConfigError):
    """A bad evaluation argument or input; the message names it."""


BATCHING = ("continuous", "batched")


@dataclass(frozen=True)
class EvalSettings:
    """Decoding settings of one run (validated like :class:`dultra_jax.decoding.DecodeConfig`)."""

    strategy: str = "planner"
    reveal: str = "bernoulli"
    gen_length: int = 256
    block_length: int = 32
    temperature: float = 0.0
    threshold: float = 0.9
    factor: float = 1.0
    steps: int | None = None
    cache: str = "none"
    batch_size: int = 8  # rows per decode call; with continuous batching, the slots
    pad_multiple: int = 64
    # continuous: decoding.generate_many refills a slot as soon as its prompt is done (single-device runs);
    # batched: sync batches of generate (always used with a mesh plan, which generate_many does not take)
    batching: str = "continuous"

    def __post_init__(self) -> None:
        from dultra_jax.decoding import DecodeConfig

        if self.batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pad_multiple < 1:
            raise EvalError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.batching not in BATCHING:
            raise EvalError(f"unknown batching {self.batching!r}; choose one of {list(BATCHING)}")
        try:
            DecodeConfig(**self.decode_kwargs())
        except ValueError as e:
            raise EvalError(str(e)) from e

    def decode_kwargs(self) -> dict[str, Any]:
        return dict(gen_length=self.gen_length, block_length=self.block_length, strategy=self.strategy,
                    reveal=self.reveal, temperature=self.temperature, threshold=self.threshold, factor=self.factor,
                    steps=self.steps, cache=self.cache)

    @property
    def series(self) -> str:
        """The method a plot draws as one line (the planner's reveal rule matters, its factor is a point)."""
        return f"planner-{self.reveal}" if self.strategy == "planner" else self.strategy

    @property
    def point_label(self) -> str:
        if self.strategy in ("planner", "factor"):
            return f"f={self.factor:g}"
        if self.strategy == "threshold":
            return f"t={self.threshold:g}"
        return f"steps={self.steps or self.gen_length}"

    @property
    def label(self) -> str:
        cache = "" if self.cache == "none" else f" {self.cache}-cache"
        return f"{self.series} {self.point_label} b{self.block_length}{cache}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodeRun:
    """Decoded prompts (input order) and the decode calls that produced them."""

    samples: list[dict[str, Any]]  # ids, nfe, equivalent_forwards, effective_tokens, masks_left, time_s, batch_rows
    batches: list[dict[str, Any]]  # rows (real), width, time_s, iterations, effective_tokens
    compile_s: float = 0.0
    widths: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- inputs
def load_examples(task: str, *, data_file: str | Path | None = None, split: str | None = None,
                  limit: int | None = None, cache_dir: str | Path | None = None, max_operand: int | None = None
                  ) -> list[Example]:
    """Problems of ``task`` with the evaluation's prompts (``style="eval"``); the first ``limit`` of them.

    The synthetic task's problems are the trainer's held-out ones (seed 1; ``max_operand`` as in
    ``task.max_operand``, default 20)."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if max_operand is not None and task != synthetic.TASK_NAME:
        raise EvalError(f"--max-operand is an option of the {synthetic.TASK_NAME} task, not of {task!r}")
    if task == synthetic.TASK_NAME:
        if data_file is not None:
            raise EvalError(f"task {task!r} is generated (no --data-file); use --limit for its size")
        if max_operand is not None and max_operand < 0:
            raise EvalError(f"--max-operand must be >= 0, got {max_operand}")
        return synthetic.addition_examples(limit or SYNTHETIC_DEFAULT_N, seed=1,
                                           **({} if max_operand is None else {"max_operand": max_operand}))
    if task not in EVAL_TASKS:
        raise EvalError(f"unknown task {task!r}; choose one of {list(EVAL_TASKS)}")
    from dultra_jax.data import load_task

    return load_task(task, split=split, data_file=data_file, style="eval", limit=limit, cache_dir=cache_dir)


def load_tokenizer(model_path: str | Path | None, task: str):
    """The model directory's tokenizer (AutoTokenizer, offline); the built-in char tokenizer for the synthetic
    task."""
    if task == synthetic.TASK_NAME:
        return synthetic.build_tokenizer()
    if model_path is None:
        raise EvalError(f"task {task!r} needs the model directory's tokenizer: pass --model")
    path = resolve_model_path(model_path)  # a hub id -> its cached snapshot (dultra_jax.load resolves it alike)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise EvalError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's "
                        "tokenizer into it (dultra convert does)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_prompts(tokenizer, examples: Sequence[Example], *, add_special_tokens: bool | None = None
                   ) -> tuple[list[str], list[list[int]]]:
    """Chat-templated prompt texts and their ids, tokenised with the tokenizer's default special tokens as the
    original's evaluation does (``add_special_tokens`` overrides)."""
    from dultra_jax.data import render_chat

    texts = [render_chat(tokenizer, list(e.messages)) for e in examples]
    kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return texts, [list(tokenizer(t, **kw)["input_ids"]) for t in texts]


def known_ids(tokenizer) -> np.ndarray:
    """Sorted ids the tokenizer can decode (the model's embedding may have more rows than the vocabulary)."""
    return np.unique(np.fromiter(tokenizer.get_vocab().values(), np.int64))


def completion_text(tokenizer, ids, known: np.ndarray | None = None) -> str:
    """Generated ids -> text without special tokens; ids the tokenizer does not know carry no text."""
    ids = np.asarray(ids)
    known = known_ids(tokenizer) if known is None else known
    return tokenizer.decode(ids[np.isin(ids, known)].tolist(), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- decoding
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

    This is the one function that decodes: with ``settings.batching == "continuous"`` and no plan it runs
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
    g = settings.gen_length
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
    if settings.batching == "continuous" and plan is None:
        return _decode_continuous(model, prompts, settings, seed=seed, seeds=seeds, exclude=exclude,
                                  progress=progress, desc=desc, max_iterations=max_iterations, compiled=compiled,
                                  warmup=warmup, on_batch=on_batch)
    from dultra_jax.decoding.loop import pad_id_of

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
        ids = np.full((b, width), pad_id, np.int32)
        mask = np.zeros((b, width), np.int32)
        for r, i in enumerate(rows):
            ids[r, width - lengths[i]:] = prompts[i]
            mask[r, width - lengths[i]:] = 1
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
                       max_iterations, compiled, warmup, on_batch) -> DecodeRun:
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
        call = dict(kw, slots=min(slots, len(idx)), row_seeds=seeds[idx].astype(np.int64))
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


# ------------------------------------------------------------------------------------------- scoring
class Scorer:
    """Scores completions as the original's evaluation does, keeping its verifier pool open across calls (the
    harness scores every batch as it finishes). Use as a context manager; ``score`` is the one-shot form.

    Per completion: ``correct`` (bool), ``status`` and the scorer's details. GSM8K by the evaluation's numeric
    parse; MATH500 by math-verify; HumanEval/MBPP by running the lm-eval programs in the sandbox; the synthetic
    task by exact match.
    """

    def __init__(self, task: str, *, workers: int | None = None):
        if task not in EVAL_TASKS:
            raise EvalError(f"unknown task {task!r}; choose one of {list(EVAL_TASKS)}")
        self.task, self.workers = task, workers
        self._verifier = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._verifier is not None and hasattr(self._verifier, "close"):
            self._verifier.close()
        self._verifier = None

    def _get_verifier(self):
        if self._verifier is None:
            if self.task == "math500":
                from dultra_jax.rewards.procpool import MathVerifier

                self._verifier = MathVerifier(workers=self.workers, mode="eval")
            else:
                from dultra_jax.rewards.code import CodeVerifier

                self._verifier = CodeVerifier(workers=self.workers)
        return self._verifier

    def __call__(self, examples: Sequence[Example], completions: Sequence[str]) -> list[dict[str, Any]]:
        if len(examples) != len(completions):
            raise EvalError(f"{len(completions)} completions for {len(examples)} problems")
        task = self.task
        if task == synthetic.TASK_NAME:
            ok = synthetic.exact_answer(completions, examples)
            return [{"correct": bool(v), "status": "correct" if v else "wrong", "reference": e.answer}
                    for v, e in zip(ok, examples, strict=True)]
        if task == "gsm8k":
            from dultra_jax.rewards.math import gsm8k_eval_correct, gsm8k_prediction

            out = []
            for c, e in zip(completions, examples, strict=True):
                pred = gsm8k_prediction(c)
                ok = gsm8k_eval_correct(c, e.answer or "")
                out.append({"correct": ok, "status": "correct" if ok else ("no_answer" if pred is None else "wrong"),
                            "extracted": pred, "reference": e.answer})
            return out
        if task == "math500":
            checks = self._get_verifier().check(list(completions), [str(e.answer) for e in examples])
            return [{"correct": c["correct"],
                     "status": "correct" if c["correct"] else ("error" if c["error"] else "wrong"),
                     "extracted": c["extracted"], "reference": c["reference"], "error": c["error"]} for c in checks]
        verifier = self._get_verifier()
        tests = [dict(e.tests or {}) for e in examples]
        fn = verifier.score_humaneval if task == "humaneval" else verifier.score_mbpp
        return [{"correct": r.passed, "status": r.status, "error": (r.error or "")[:500] or None}
                for r in fn(tests, list(completions))]


def score(task: str, examples: Sequence[Example], completions: Sequence[str], *, workers: int | None = None
          ) -> list[dict[str, Any]]:
    """Per completion: ``correct`` (bool), ``status`` and the scorer's details, as the original's evaluation scores."""
    with Scorer(task, workers=workers) as scorer:
        return scorer(examples, completions)


# ------------------------------------------------------------------------------------------- samples file
SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
SHARD_GLOB = "samples.p*-of-*.jsonl"  # one per process of a multi-process run
# Settings that must match for --resume to extend a samples file (the rows would otherwise mix two runs).
_RUN_KEYS = ("task", "settings", "n_problems", "problem_ids")


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The complete rows of a samples file. A malformed last line (a write cut off by an interruption) is
    reported with a warning naming the file and line and dropped; a malformed line before it is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    ends_clean = lines[-1] == b""
    if ends_clean:
        lines.pop()
    rows = []
    for k, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not {"seed", "id", "correct"} <= row.keys():
                raise ValueError("not a sample row (needs seed, id, correct)")
            if k == len(lines) and not ends_clean:
                raise ValueError("no final newline (the write was cut off)")
        except ValueError as e:
            if k == len(lines):
                warnings.warn(f"{path}: line {k} is incomplete or malformed ({e}); ignoring it", stacklevel=2)
                break
            raise EvalError(f"{path}: line {k} is malformed ({e}); the file is corrupt (not just cut off), "
                            "remove the line, or replace the run with --overwrite (its rows are lost)") from e
        rows.append(row)
    return rows


class SampleLog:
    """``samples.jsonl`` appended as batches finish: each batch's rows are written, flushed and fsynced, so an
    interruption loses at most the batch being decoded."""

    def __init__(self, path: Path, rows: Sequence[dict[str, Any]] = ()):
        path.parent.mkdir(parents=True, exist_ok=True)
        # rewrite the kept rows first: a cut-off last line must not be glued to the next append
        write_atomic(path, "".join(_dumps(r) + "\n" for r in rows))
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        self._f.write("".join(_dumps(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, default=_json_default)


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows on every process (JSON bytes through ``process_allgather``); identity on one."""
    import jax

    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(rows, default=_json_default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(buf))
    return [r for k, n in enumerate(sizes) for r in json.loads(everything[k, : int(n)].tobytes().decode())]


# ------------------------------------------------------------------------------------------- runs
def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvalError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EvalError(f"--seeds has repeated values: {seeds}")
    return seeds


def _local_plan_check(plan) -> None:
    import jax

    if plan is not None and any(d.process_index != jax.process_index() for d in plan.mesh.devices.flat):
        raise EvalError("evaluation shards each process's own problems over its local devices: build the "
                        "ShardingPlan over jax.local_devices() (dultra eval --mesh does), not a mesh spanning "
                        "processes")


def evaluate(model, tokenizer, examples: Sequence[Example], settings: EvalSettings, *, task: str,
             seeds: Sequence[int] = (0,), out_dir: str | Path | None = None, workers: int | None = None,
             progress: bool = True, meta: dict[str, Any] | None = None, resume: bool = False, plan=None,
             warmup: bool = True, scorer: Callable[[Sequence[Example], Sequence[str]], list[dict]] | None = None
             ) -> dict[str, Any]:
    """Decode and score ``examples`` once per seed; returns the summary (and writes the files to ``out_dir``).

    Rows are appended to ``out_dir/samples.jsonl`` (flushed, fsynced) as each batch is decoded and scored;
    ``resume`` keeps the rows already there (same task, settings and problems, else an error) and decodes only
    the missing (seed, problem) pairs. The summary is computed from the rows of the file, so a resumed run
    reports what an uninterrupted one does (timings aside).

    ``plan`` splits each batch over the devices of its mesh (this process's devices). With several JAX
    processes each decodes and scores every ``process_count``-th problem into its own
    ``samples.p<i>-of-<n>.jsonl``; process 0 then writes the merged ``samples.jsonl`` and ``summary.json``.
    Each problem's randomness is keyed by its index, so sharding and batching do not change any result.
    ``warmup=False`` skips the untimed first call per shape (training-time evaluation, where speed is not
    reported). ``scorer`` replaces the task's scorer (tasks the harness does not score).
    """
    import jax

    seeds = _check_seeds(seeds)
    if not examples:
        raise EvalError(f"task {task!r} has no problems to evaluate")
    _local_plan_check(plan)
    cfg = model.cfg
    texts, prompts = encode_prompts(tokenizer, examples)
    too_long = [(e.id, len(p)) for e, p in zip(examples, prompts, strict=True)
                if len(p) + settings.gen_length > cfg.max_sequence_length]
    if too_long:
        raise EvalError(f"{len(too_long)} prompt(s) do not fit the model's max_sequence_length "
                        f"{cfg.max_sequence_length} with gen_length {settings.gen_length}, e.g. {too_long[0][0]!r} "
                        f"({too_long[0][1]} tokens)")
    ids = [str(e.id) for e in examples]
    if len(set(ids)) != len(ids):
        raise EvalError(f"task {task!r}: problem ids are not unique")
    if plan is not None:
        model = plan.shard_model(model)
    exclude = accounting.model_excluded_ids(cfg, tokenizer)
    known = known_ids(tokenizer)
    pid, nproc = jax.process_index(), jax.process_count()
    mine = list(range(pid, len(examples), nproc))  # this process's share of the problems
    # batch size does not change any result (rows are keyed by their problem), so a resume may use another
    run_info = {**_run_info(task, settings, examples), "seeds": seeds, "processes": nproc}
    out = Path(out_dir) if out_dir is not None else None
    log = None
    done: list[dict[str, Any]] = []
    if out is not None:
        own = out / (SAMPLES_FILE if nproc == 1 else f"samples.p{pid}-of-{nproc}.jsonl")
        if resume:
            _check_resumable(out / RUN_FILE, run_info)
            wanted = {(s, ids[i]) for s in seeds for i in mine}
            seen: dict[tuple[int, str], dict] = {}
            # own file first, then a merged file and other processes' shards of an earlier run (any process count)
            for f in dict.fromkeys([own, out / SAMPLES_FILE, *sorted(out.glob(SHARD_GLOB))]):
                for r in read_samples(f):
                    key = (int(r["seed"]), str(r["id"]))
                    if key in wanted and key not in seen:
                        seen[key] = r
            done = list(seen.values())
        elif pid == 0:  # a fresh run: rows of an earlier one must not be picked up by a later --resume
            stale = [out / SAMPLES_FILE] if nproc > 1 else []
            stale += [f for f in out.glob(SHARD_GLOB) if not f.name.endswith(f"-of-{nproc}.jsonl")]
            for f in stale:
                f.unlink(missing_ok=True)
        if pid == 0:
            write_atomic(out / RUN_FILE, json.dumps(run_info, indent=2) + "\n")
        log = SampleLog(own, done)
    done_keys = {(int(r["seed"]), str(r["id"])) for r in done}
    rows: list[dict[str, Any]] = list(done)
    compile_s, compiled = 0.0, set()
    run_token = f"{os.getpid():x}{time.time_ns() & 0xFFFFFF:06x}"
    own_scorer = scorer is None
    scorer = Scorer(task, workers=workers) if own_scorer else scorer
    try:
        for seed in seeds:
            todo = [i for i in mine if (seed, ids[i]) not in done_keys]
            if not todo:
                continue
            counter = iter(range(len(todo)))

            def on_batch(positions, samples, batch, seed=seed, todo=todo, counter=counter):
                exs = [examples[todo[k]] for k in positions]
                new = []
                batch_id = f"{run_token}-p{pid}-s{seed}-{next(counter)}"
                for k, e, smp in zip(positions, exs, samples, strict=True):
                    new.append({"seed": seed, "id": str(e.id), "index": e.index, "prompt": texts[todo[k]],
                                "completion": completion_text(tokenizer, smp["ids"], known), "nfe": smp["nfe"],
                                "effective_tokens": smp["effective_tokens"],
                                "equivalent_forwards": round(smp["equivalent_forwards"], 4),
                                "masks_left": smp["masks_left"], "time_s": round(smp["time_s"], 6),
                                "batch_rows": smp["batch_rows"], "width": smp["width"], "batch": batch_id,
                                "process": pid})
                for r, v in zip(new, scorer(exs, [r["completion"] for r in new]), strict=True):
                    v = dict(v)
                    r.update(correct=bool(v.pop("correct")), **v)
                rows.extend(new)
                if log is not None:
                    log.append(new)

            run = decode_prompts(model, [prompts[i] for i in todo], settings, seed=seed,
                                 row_seeds=[examples[i].index for i in todo], exclude=exclude, progress=progress,
                                 desc=f"{task} {settings.label} seed {seed}", compiled=compiled, plan=plan,
                                 warmup=warmup, on_batch=on_batch)
            compile_s += run.compile_s
    finally:
        if own_scorer:
            scorer.close()
        if log is not None:
            log.close()
    if log is not None:
        rows = read_samples(log.path)  # the summary is what the file holds
    rows = _gather_rows(rows)
    order = {(s, i): k for k, (s, i) in enumerate((s, i) for s in seeds for i in ids)}
    rows.sort(key=lambda r: order[(int(r["seed"]), str(r["id"]))])
    if len(rows) != len(order):
        raise EvalError(f"expected {len(order)} samples ({len(seeds)} seed(s) x {len(ids)} problems), got "
                        f"{len(rows)}")
    summary = summarize(rows, settings, task=task, seeds=seeds, n_problems=len(examples), exclude=exclude,
                        prompt_lengths=[len(p) for p in prompts], batch_size=min(settings.batch_size, len(examples)),
                        meta=meta)
    summary["compile_and_warmup_s"] = round(compile_s, 3)
    summary["resumed_samples"] = len(done)
    summary["processes"] = nproc
    if plan is not None:
        summary["mesh"] = {k: int(v) for k, v in plan.mesh.shape.items()}
    if out is not None and pid == 0:  # the finished file: every row, in (seed, problem) order
        write_atomic(out / SAMPLES_FILE, "".join(_dumps(r) + "\n" for r in rows))
        summary["samples_file"] = SAMPLES_FILE
        write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _run_info(task: str, settings: EvalSettings, examples: Sequence[Example]) -> dict[str, Any]:
    """What a run is, for --resume: the task, the settings (batch size aside: it changes no result), the problems."""
    return {"task": task, "settings": {k: v for k, v in settings.to_dict().items() if k != "batch_size"},
            "n_problems": len(examples), "problem_ids": [str(e.id) for e in examples]}


def _check_resumable(path: Path, info: dict[str, Any]) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EvalError(f"--resume: {path} is unreadable ({e})") from e
    diff = run_differences(old if isinstance(old, dict) else {}, info)
    if diff:
        raise EvalError(f"--resume: {path.parent} holds a run with different settings ({'; '.join(diff)}); pass "
                        "the same settings to continue it, or choose another --out")


def run_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a recorded run and this one, as 'name: was X, now Y' items (settings by name)."""
    out = []
    for key in _RUN_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}: was {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                    if a.get(k) != b.get(k)]
        elif key == "problem_ids":
            if old.get("n_problems") == new.get("n_problems"):
                out.append("the problems (same count, other ids: another --data-file, --split or --max-operand?)")
        else:
            out.append(f"{key}: was {a!r}, now {b!r}")
    return out


def summarize(rows: Sequence[dict[str, Any]], settings: EvalSettings, *, task: str, seeds: Sequence[int],
              n_problems: int, exclude: Sequence[int], prompt_lengths: Sequence[int], batch_size: int,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of sample rows (as read back from ``samples.jsonl``): accuracy over seeds, NFE/TPF, and the
    throughput of the decode calls (rows sharing a ``batch`` id came from one call; processes run at once, so
    the decode time is the longest process's)."""
    batches: dict[str, dict[str, Any]] = {}
    for k, r in enumerate(rows):
        b = batches.setdefault(str(r.get("batch", k)), {"rows": 0, "time_s": float(r["time_s"]),
                                                        "effective_tokens": 0, "process": int(r.get("process", 0))})
        b["rows"] += 1
        b["effective_tokens"] += int(r["effective_tokens"])
    speed = metrics.speed_summary(rows, list(batches.values()), settings.gen_length)
    per_process: dict[int, float] = {}
    for b in batches.values():
        per_process[b["process"]] = per_process.get(b["process"], 0.0) + b["time_s"]
    if len(per_process) > 1:  # concurrent processes: wall time is the slowest one's, not the sum
        wall = max(per_process.values())
        speed["decode_time_s"] = wall
        speed["positions_per_s"] = len(rows) * settings.gen_length / wall if wall > 0 else float("nan")
        speed["effective_tokens_per_s"] = (sum(int(r["effective_tokens"]) for r in rows) / wall
                                           if wall > 0 else float("nan"))
    widths = sorted({int(r["width"]) for r in rows if "width" in r})
    return {
        "task": task, "label": settings.label, "series": settings.series, "point_label": settings.point_label,
        "n_problems": n_problems, "seeds": list(seeds), "n_samples": len(rows),
        **metrics.accuracy_over_seeds(rows),
        **speed,
        "batch_size": batch_size,
        "prompt_length": {"mean": float(np.mean(prompt_lengths)), "min": min(prompt_lengths),
                          "max": max(prompt_lengths)},
        "padded_prompt_widths": widths,
        "gen_length": settings.gen_length, "block_length": settings.block_length,
        "settings": settings.to_dict(),
        "excluded_ids": list(exclude),
        **(meta or {}),
        "device": device_name(), "jax": _jax_version(), "commit": git_commit(), "dirty": git_dirty(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "definitions": {
            "accuracy": "mean over seeds of the fraction correct; accuracy_std = sample std over seeds",
            "nfe": "backbone forwards in which the sample's row was still decoding",
            "tpf": "mean effective tokens / mean NFE; effective = generated ids not in excluded_ids",
            "positions_per_s": "real rows x gen_length / decode wall time (prompts not counted, compile excluded; "
                               "several processes: the slowest process's decode time)",
            "effective_tokens_per_s": "effective tokens / decode wall time",
            "time_s": "per sample: wall time of the batched decode call that produced it",
        },
    }


def _jax_version() -> str:
    import jax

    return jax.__version__


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def local_plan(mesh: str):
    """A :class:`~dultra_jax.parallel.ShardingPlan` over this process's devices from a spec such as ``"data=8"``
    (the other axes default to 1: evaluation splits rows, it does not shard the weights unless asked; fixed
    sizes use the first devices, ``-1`` the rest of them)."""
    from dultra_jax.parallel import MeshConfig, MeshError, ShardingPlan

    try:
        spec = MeshConfig.parse(mesh)
        if "fsdp" not in str(mesh) and spec.fsdp == -1:  # "data=8" means data=8 (not data=8 x fsdp=rest)
            spec = MeshConfig(data=spec.data, fsdp=1, tensor=spec.tensor)
        import jax

        devices = jax.local_devices()
        need = int(np.prod(list(spec.sizes.values())))
        if need > 0:  # fixed sizes: the first `need` local devices (e.g. data=2 on an 8-device host)
            if need > len(devices):
                raise MeshError(f"mesh {spec} needs {need} devices but this process has {len(devices)}")
            devices = devices[:need]
        return ShardingPlan.create(spec, devices=devices)
    except MeshError as e:
        raise EvalError(f"--mesh {mesh}: {e}") from e


def sweep_settings(base: EvalSettings, factors: Sequence[float] = SWEEP_FACTORS) -> list[tuple[str, EvalSettings]]:
    """The original's factor sweeps: the Fast-dLLM factor baseline and the planner scaled by the same factors."""
    if not factors:
        raise EvalError("the factor sweep needs at least one factor")
    return [(f"{s}-f{f:g}", replace(base, strategy=s, factor=float(f))) for s in SWEEP_STRATEGIES for f in factors]


def run_eval(model_path: str | Path | None, task: str, settings: EvalSettings, *, seeds: Sequence[int] = (0,),
             data_file: str | Path | None = None, split: str | None = None, limit: int | None = None,
             out_dir: str | Path = "runs/eval", dtype: str = "bf16", factor_sweep: bool = False,
             factors: Sequence[float] = SWEEP_FACTORS, workers: int | None = None, progress: bool = True,
             model=None, cache_dir: str | Path | None = None, resume: bool = False, mesh: str | None = None,
             plan=None, max_operand: int | None = None, overwrite: bool = False) -> list[dict[str, Any]]:
    """``dultra eval``: load the model and task, run one evaluation (or the factor sweep), write the files.

    One run writes ``out_dir/summary.json`` and ``out_dir/samples.jsonl``; the sweep writes them under
    ``out_dir/<strategy>-f<factor>/`` and an index ``out_dir/sweep.json``. Returns the summaries. ``resume``
    continues the runs found there; ``mesh`` (e.g. ``"data=8"``) or ``plan`` splits the batches over this
    process's devices (:func:`local_plan`); several JAX processes split the problems (see :func:`evaluate`).
    Results already in ``out_dir`` are refused unless ``resume`` or ``overwrite``. A model exported by the
    trainer records its task settings; the synthetic task's ``max_operand`` defaults to the recorded one.
    """
    seeds = _check_seeds(seeds)
    out = Path(out_dir)
    runs = sweep_settings(settings, factors) if factor_sweep else [("", settings)]
    for name, _ in runs:
        check_results_dir(out / name if name else out, (SAMPLES_FILE, "summary.json"), resume=resume,
                          overwrite=overwrite, resume_marker=RUN_FILE)
    if factor_sweep:
        check_results_dir(out, ("sweep.json",), resume=resume, overwrite=overwrite)
    if model is None and model_path is not None and parse_hub_id(str(model_path)) is None:
        resolve_model_path(model_path)  # a missing local model is reported before any work
    if task == synthetic.TASK_NAME and max_operand is None and model_path is not None:
        max_operand = recorded_task(model_path).get("max_operand")
    if plan is None and mesh is not None:
        plan = local_plan(mesh)
    examples = load_examples(task, data_file=data_file, split=split, limit=limit, cache_dir=cache_dir,
                             max_operand=max_operand)
    if resume:  # refuse a mismatched resume before anything is loaded
        for name, s in runs:
            _check_resumable((out / name if name else out) / RUN_FILE, _run_info(task, s, examples))
    tokenizer = load_tokenizer(model_path, task)
    if model is None:
        if model_path is None:
            raise EvalError("pass --model (a checkpoint directory)")
        import dultra_jax

        model = dultra_jax.load(model_path, dtype=dtype)
    meta = {"model": str(model_path) if model_path is not None else "(in memory)", "dtype": str(dtype),
            "data": str(data_file) if data_file else ("generated" if task == synthetic.TASK_NAME else "hub")}
    summaries = []
    for name, s in runs:
        target = out / name if name else out
        summary = evaluate(model, tokenizer, examples, s, task=task, seeds=seeds, out_dir=target, workers=workers,
                           progress=progress, meta=meta, resume=resume, plan=plan)
        summary["run_dir"] = str(target)
        summaries.append(summary)
    import jax

    if factor_sweep and jax.process_index() == 0:
        index = [{k: s[k] for k in ("label", "series", "point_label", "accuracy", "accuracy_std", "mean_nfe", "tpf",
                                    "run_dir")} for s in summaries]
        write_atomic(out / "sweep.json", json.dumps(index, indent=2) + "\n")
    return summaries


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One line per run: label, accuracy +- std, mean NFE, TPF, positions/s, effective tokens/s."""
    lines = [f"{'run':<34} {'accuracy':>15} {'NFE':>7} {'TPF':>6} {'pos/s':>9} {'eff tok/s':>10}"]
    for s in summaries:
        acc = f"{100 * s['accuracy']:.1f} +- {100 * s['accuracy_std']:.1f}"
        lines.append(f"{s['label']:<34} {acc:>15} {s['mean_nfe']:7.2f} {s['tpf']:6.2f} {s['positions_per_s']:9.1f} "
                     f"{s['effective_tokens_per_s']:10.1f}")
    return "\n".join(lines)
