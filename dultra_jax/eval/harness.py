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

Scoring is each task's own definition of correct (:mod:`dultra_jax.tasks`; docs/evaluation.md lists them).

The jobs live in their own modules: :mod:`~dultra_jax.eval.settings` (the run's decoding settings),
:mod:`~dultra_jax.eval.inputs` (problems, tokenizer, prompt ids), :mod:`~dultra_jax.eval.decode` (the decode
drivers), :mod:`~dultra_jax.eval.score` (scoring), :mod:`~dultra_jax.eval.record` (samples file, resume, merge,
summary). This module runs them; their public names are importable from here too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax.atomic import write_atomic
from dultra_jax.checkpoints.hub import parse_hub_id, resolve_model_path
from dultra_jax.checkpoints.store import recorded_task
from dultra_jax.data import synthetic
from dultra_jax.data.tasks import Example
from dultra_jax.eval.decode import CONTINUOUS_CHUNK, DecodeRun, decode_prompts
from dultra_jax.eval.inputs import (
    EVAL_TASKS,
    SYNTHETIC_DEFAULT_N,
    TOKENIZER_FILES,
    completion_text,
    encode_prompts,
    eval_task,
    known_ids,
    load_examples,
    load_tokenizer,
)
from dultra_jax.eval.record import (
    RUN_FILE,
    SAMPLES_FILE,
    SHARD_GLOB,
    SampleLog,
    _check_resumable,
    _dumps,
    _gather_rows,
    _json_default,
    _run_info,
    format_table,
    read_samples,
    summarize,
)
from dultra_jax.eval.score import Scorer, score
from dultra_jax.eval.settings import (
    BATCHING,
    SWEEP_FACTORS,
    SWEEP_STRATEGIES,
    EvalError,
    EvalSettings,
    sweep_settings,
)
from dultra_jax.outputs import check_results_dir
from dultra_jax.text import TextModel

__all__ = [
    "BATCHING", "CONTINUOUS_CHUNK", "EVAL_TASKS", "RUN_FILE", "SAMPLES_FILE", "SHARD_GLOB", "SWEEP_FACTORS",
    "SWEEP_STRATEGIES", "SYNTHETIC_DEFAULT_N", "TOKENIZER_FILES", "DecodeRun", "EvalError", "EvalSettings",
    "SampleLog", "Scorer", "completion_text", "decode_prompts", "encode_prompts", "evaluate", "format_table",
    "known_ids", "load_examples", "load_tokenizer", "local_plan", "read_samples", "run_eval", "score",
    "summarize", "sweep_settings",
]


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
    # prompts in, answers out through the one text object the server and `dultra generate` use; the decoding
    # itself stays decode_prompts' (sync or continuous batches, mesh, resume) with `settings`
    text = TextModel(model, tokenizer, slots=settings.batch_size)
    texts, prompts = encode_prompts(text, examples)
    too_long = [(e.id, len(p)) for e, p in zip(examples, prompts, strict=True)
                if len(p) + settings.decode.gen_length > cfg.max_sequence_length]
    if too_long:
        raise EvalError(f"{len(too_long)} prompt(s) do not fit the model's max_sequence_length "
                        f"{cfg.max_sequence_length} with gen_length {settings.decode.gen_length}, "
                        f"e.g. {too_long[0][0]!r} "
                        f"({too_long[0][1]} tokens)")
    ids = [str(e.id) for e in examples]
    if len(set(ids)) != len(ids):
        raise EvalError(f"task {task!r}: problem ids are not unique")
    if plan is not None:
        model = plan.shard_model(model)
    exclude = text.excluded
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
                                "completion": text.decode(smp["ids"]), "nfe": smp["nfe"],
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
            "data": str(data_file) if data_file else ("generated" if eval_task(task).hub is None else "hub")}
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
