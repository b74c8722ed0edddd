"""Evaluation harness: the original's eval prompts and scoring, batched padding-correct decoding, honest speed.

One run = (model, task, decoding settings, seeds). For each seed every problem is decoded once (greedy tokens
unless ``temperature`` > 0; the planner's reveals are seeded), scored as the original scores it, and recorded:

- ``samples.jsonl``: one line per (seed, problem): prompt, completion, correct, NFE, effective tokens, the wall
  time of the decode call that produced it, and the scorer's details.
- ``summary.json``: accuracy (mean and sample std over seeds), mean NFE, TPF, positions/s and effective
  tokens/s (generated tokens only, compilation excluded), batch, prompt/gen/block lengths, settings, device,
  commit. Definitions: :mod:`dultra_jax.eval.metrics`.

Batching is padding-correct: prompts are left-padded and attention ignores the pads, and every row's
randomness is keyed by its problem's index, so a problem's completion does not depend on the batch it lands
in (batch 1 reproduces any row). Prompts are sorted by length (less padding) and padded up to a multiple of
``pad_multiple`` tokens, so a whole evaluation compiles the decoding loop only a few times.

Scoring (REFERENCE_TRAINING.md §5): GSM8K by the evaluation's numeric parse (|pred - gt| < 1e-5); MATH500 by
math-verify on the last ``\\boxed{}`` (string-normaliser fallback); HumanEval/MBPP by running the lm-eval
programs in the sandbox (pass@1); the synthetic addition task by exact match.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax import accounting
from dultra_jax.atomic import write_atomic
from dultra_jax.checkpoints.hub import resolve_model_path
from dultra_jax.config import ConfigError
from dultra_jax.data import synthetic
from dultra_jax.data.tasks import Example
from dultra_jax.eval import metrics
from dultra_jax.eval.env import device_name, git_commit, git_dirty

EVAL_TASKS = ("gsm8k", "math500", "humaneval", "mbpp", synthetic.TASK_NAME)
SWEEP_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)
SWEEP_STRATEGIES = ("factor", "planner")
SYNTHETIC_DEFAULT_N = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class EvalError(ConfigError):
    """A bad evaluation argument or input; the message names it."""


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
    batch_size: int = 8
    pad_multiple: int = 64

    def __post_init__(self) -> None:
        from dultra_jax.decoding import DecodeConfig

        if self.batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pad_multiple < 1:
            raise EvalError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
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
                  limit: int | None = None, cache_dir: str | Path | None = None) -> list[Example]:
    """Problems of ``task`` with the evaluation's prompts (``style="eval"``); the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if task == synthetic.TASK_NAME:
        if data_file is not None:
            raise EvalError(f"task {task!r} is generated (no --data-file); use --limit for its size")
        return synthetic.addition_examples(limit or SYNTHETIC_DEFAULT_N, seed=1)
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
                   compiled: set[tuple[int, int]] | None = None) -> DecodeRun:
    """Decode every prompt in batches of ``settings.batch_size`` (left-padded, pad-aware attention).

    Each new (batch, width) shape is compiled and run once untimed first, so ``time_s`` is decoding only.
    ``row_seeds`` (default: the prompt's position) key each row's randomness. ``compiled`` carries the shapes
    already warmed up across calls with the same settings (e.g. the seeds of one run).
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
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    b = min(settings.batch_size, n)
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
        try:
            if (b, width) not in compiled:
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
        eq = np.asarray(result.equivalent_forwards)
        counted = accounting.account(gen, nfe, exclude, cfg.mask_token_id)
        eff = counted.effective_tokens
        for r, i in enumerate(idx):
            samples[i] = {"ids": gen[r], "nfe": int(nfe[r]), "equivalent_forwards": float(eq[r]),
                          "effective_tokens": int(eff[r]), "masks_left": int(counted.masks_left[r]),
                          "time_s": dt, "batch_rows": len(idx)}
        batches.append({"rows": len(idx), "width": width, "time_s": dt, "iterations": int(result.iterations),
                        "effective_tokens": int(eff[: len(idx)].sum())})
    return DecodeRun(samples=samples, batches=batches, compile_s=compile_s, widths=sorted(widths))


# ------------------------------------------------------------------------------------------- scoring
def score(task: str, examples: Sequence[Example], completions: Sequence[str], *, workers: int | None = None
          ) -> list[dict[str, Any]]:
    """Per completion: ``correct`` (bool), ``status`` and the scorer's details, as the original's evaluation scores."""
    if len(examples) != len(completions):
        raise EvalError(f"{len(completions)} completions for {len(examples)} problems")
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
        from dultra_jax.rewards.procpool import MathVerifier

        with MathVerifier(workers=workers, mode="eval") as verifier:
            checks = verifier.check(list(completions), [str(e.answer) for e in examples])
        return [{"correct": c["correct"], "status": "correct" if c["correct"] else ("error" if c["error"] else "wrong"),
                 "extracted": c["extracted"], "reference": c["reference"], "error": c["error"]} for c in checks]
    if task in ("humaneval", "mbpp"):
        from dultra_jax.rewards.code import CodeVerifier

        verifier = CodeVerifier(workers=workers)
        tests = [dict(e.tests or {}) for e in examples]
        fn = verifier.score_humaneval if task == "humaneval" else verifier.score_mbpp
        return [{"correct": r.passed, "status": r.status, "error": (r.error or "")[:500] or None}
                for r in fn(tests, list(completions))]
    raise EvalError(f"unknown task {task!r}; choose one of {list(EVAL_TASKS)}")


# ------------------------------------------------------------------------------------------- runs
def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvalError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise EvalError(f"--seeds has repeated values: {seeds}")
    return seeds


def evaluate(model, tokenizer, examples: Sequence[Example], settings: EvalSettings, *, task: str,
             seeds: Sequence[int] = (0,), out_dir: str | Path | None = None, workers: int | None = None,
             progress: bool = True, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode and score ``examples`` once per seed; returns the summary (and writes the two files to ``out_dir``)."""
    seeds = _check_seeds(seeds)
    if not examples:
        raise EvalError(f"task {task!r} has no problems to evaluate")
    cfg = model.cfg
    texts, prompts = encode_prompts(tokenizer, examples)
    too_long = [(e.id, len(p)) for e, p in zip(examples, prompts, strict=True)
                if len(p) + settings.gen_length > cfg.max_sequence_length]
    if too_long:
        raise EvalError(f"{len(too_long)} prompt(s) do not fit the model's max_sequence_length "
                        f"{cfg.max_sequence_length} with gen_length {settings.gen_length}, e.g. {too_long[0][0]!r} "
                        f"({too_long[0][1]} tokens)")
    exclude = accounting.model_excluded_ids(cfg, tokenizer)
    known = known_ids(tokenizer)
    rows: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    compile_s, widths, compiled = 0.0, set(), set()
    for seed in seeds:
        run = decode_prompts(model, prompts, settings, seed=seed, row_seeds=[e.index for e in examples],
                             exclude=exclude, progress=progress, desc=f"{task} {settings.label} seed {seed}",
                             compiled=compiled)
        compile_s += run.compile_s
        widths.update(run.widths)
        batches += run.batches
        for e, text, s in zip(examples, texts, run.samples, strict=True):
            rows.append({"seed": seed, "id": e.id, "index": e.index, "prompt": text,
                         "completion": completion_text(tokenizer, s["ids"], known), "nfe": s["nfe"],
                         "effective_tokens": s["effective_tokens"],
                         "equivalent_forwards": round(s["equivalent_forwards"], 4), "masks_left": s["masks_left"],
                         "time_s": round(s["time_s"], 6), "batch_rows": s["batch_rows"]})
    verdicts = score(task, [e for _ in seeds for e in examples], [r["completion"] for r in rows], workers=workers)
    for r, v in zip(rows, verdicts, strict=True):
        r.update(correct=bool(v.pop("correct")), **v)
    lengths = [len(p) for p in prompts]
    summary = {
        "task": task, "label": settings.label, "series": settings.series, "point_label": settings.point_label,
        "n_problems": len(examples), "seeds": seeds, "n_samples": len(rows),
        **metrics.accuracy_over_seeds(rows),
        **metrics.speed_summary(rows, batches, settings.gen_length),
        "compile_and_warmup_s": round(compile_s, 3),
        "batch_size": min(settings.batch_size, len(examples)),
        "prompt_length": {"mean": float(np.mean(lengths)), "min": min(lengths), "max": max(lengths)},
        "padded_prompt_widths": sorted(widths),
        "gen_length": settings.gen_length, "block_length": settings.block_length,
        "settings": settings.to_dict(),
        "excluded_ids": exclude,
        **(meta or {}),
        "device": device_name(), "jax": _jax_version(), "commit": git_commit(), "dirty": git_dirty(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "definitions": {
            "accuracy": "mean over seeds of the fraction correct; accuracy_std = sample std over seeds",
            "nfe": "backbone forwards in which the sample's row was still decoding",
            "tpf": "mean effective tokens / mean NFE; effective = generated ids not in excluded_ids",
            "positions_per_s": "real rows x gen_length / decode wall time (prompts not counted, compile excluded)",
            "effective_tokens_per_s": "effective tokens / decode wall time",
            "time_s": "per sample: wall time of the batched decode call that produced it",
        },
    }
    if out_dir is not None:
        out = Path(out_dir)
        write_atomic(out / "samples.jsonl", "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
        summary["samples_file"] = "samples.jsonl"
        write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _jax_version() -> str:
    import jax

    return jax.__version__


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sweep_settings(base: EvalSettings, factors: Sequence[float] = SWEEP_FACTORS) -> list[tuple[str, EvalSettings]]:
    """The original's factor sweeps: the Fast-dLLM factor baseline and the planner scaled by the same factors."""
    if not factors:
        raise EvalError("the factor sweep needs at least one factor")
    return [(f"{s}-f{f:g}", replace(base, strategy=s, factor=float(f))) for s in SWEEP_STRATEGIES for f in factors]


def run_eval(model_path: str | Path | None, task: str, settings: EvalSettings, *, seeds: Sequence[int] = (0,),
             data_file: str | Path | None = None, split: str | None = None, limit: int | None = None,
             out_dir: str | Path = "runs/eval", dtype: str = "bf16", factor_sweep: bool = False,
             factors: Sequence[float] = SWEEP_FACTORS, workers: int | None = None, progress: bool = True,
             model=None, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """``dultra eval``: load the model and task, run one evaluation (or the factor sweep), write the files.

    One run writes ``out_dir/summary.json`` and ``out_dir/samples.jsonl``; the sweep writes them under
    ``out_dir/<strategy>-f<factor>/`` and an index ``out_dir/sweep.json``. Returns the summaries.
    """
    seeds = _check_seeds(seeds)
    examples = load_examples(task, data_file=data_file, split=split, limit=limit, cache_dir=cache_dir)
    tokenizer = load_tokenizer(model_path, task)
    if model is None:
        if model_path is None:
            raise EvalError("pass --model (a checkpoint directory)")
        import dultra_jax

        model = dultra_jax.load(model_path, dtype=dtype)
    meta = {"model": str(model_path) if model_path is not None else "(in memory)", "dtype": str(dtype),
            "data": str(data_file) if data_file else ("generated" if task == synthetic.TASK_NAME else "hub")}
    out = Path(out_dir)
    runs = sweep_settings(settings, factors) if factor_sweep else [("", settings)]
    summaries = []
    for name, s in runs:
        target = out / name if name else out
        summary = evaluate(model, tokenizer, examples, s, task=task, seeds=seeds, out_dir=target, workers=workers,
                           progress=progress, meta=meta)
        summary["run_dir"] = str(target)
        summaries.append(summary)
    if factor_sweep:
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
