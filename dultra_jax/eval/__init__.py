"""Evaluation: the original's eval prompts and scoring over batched, padding-correct decoding; NFE/TPF and
throughput counted honestly (generated tokens only, compile excluded); accuracy-vs-NFE plots.

``dultra eval`` / :func:`run_eval` for a checkpoint directory; :func:`evaluate` for a model in memory.
"""

from dultra_jax.accounting import excluded_ids, tpf
from dultra_jax.eval.harness import (
    EVAL_TASKS,
    SWEEP_FACTORS,
    DecodeRun,
    EvalError,
    EvalSettings,
    Scorer,
    decode_prompts,
    encode_prompts,
    evaluate,
    format_table,
    load_examples,
    load_tokenizer,
    local_plan,
    read_samples,
    run_eval,
    score,
    sweep_settings,
)
from dultra_jax.eval.metrics import accuracy_over_seeds, distribution, speed_summary

__all__ = [
    "EVAL_TASKS", "SWEEP_FACTORS", "DecodeRun", "EvalError", "EvalSettings", "Scorer", "accuracy_over_seeds",
    "decode_prompts", "distribution", "encode_prompts", "evaluate", "excluded_ids", "format_table", "load_examples",
    "load_tokenizer", "local_plan", "read_samples", "run_eval", "score", "speed_summary", "sweep_settings", "tpf",
]
