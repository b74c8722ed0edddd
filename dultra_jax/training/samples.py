"""What a GRPO run shows about its rollouts: completion statistics and a few sampled completions per step.

The numbers TRL logs and a degrading run is first read by (docs/training-data.md): completion length (tokens up
to and including the first end token, the whole generation when there is none), the fraction of completions
that ended with an end token, ``frac_reward_zero_std`` (groups whose rewards are all equal, so their advantages
are zero and they teach nothing) and each reward's spread. Every ``logging.samples_every`` steps a few
completions (prompt, text, each reward term, NFE, length, truncated) are appended to ``<run>/samples.jsonl`` and
mirrored into TensorBoard text and a W&B table (process 0 only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_FILE = "samples.jsonl"


def completion_lengths(generated: np.ndarray, stop_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """([B] lengths, [B] terminated) of ``generated`` [B, G] ids: tokens up to and including the first id of
    ``stop_ids``, or G for a row without one (then ``terminated`` is False: the completion was truncated)."""
    gen = np.asarray(generated)
    stop = np.isin(gen, np.asarray(list(stop_ids), np.int64))
    terminated = stop.any(-1)
    lengths = np.where(terminated, stop.argmax(-1) + 1, gen.shape[1])
    return lengths.astype(np.int64), terminated


def frac_reward_zero_std(totals: np.ndarray, num_generations: int) -> float:
    """Fraction of groups (consecutive ``num_generations`` rows) whose total rewards have zero std (TRL's
    ``isclose(std, 0)``): groups whose advantages are all zero."""
    std = np.asarray(totals, np.float64).reshape(-1, num_generations).std(-1)
    return float(np.mean(np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)))


def rollout_metrics(lengths: np.ndarray, terminated: np.ndarray, totals: np.ndarray,
                    per_function: Mapping[str, np.ndarray], num_generations: int) -> dict[str, float]:
    """Completion-length, termination and reward-spread metrics of one rollout's rows (all processes')."""
    lengths = np.asarray(lengths, np.float64)
    out = {"completion_length_mean": float(lengths.mean()), "completion_length_min": float(lengths.min()),
           "completion_length_max": float(lengths.max()),
           "eos_terminated_ratio": float(np.mean(terminated)),
           "frac_reward_zero_std": frac_reward_zero_std(totals, num_generations)}
    for name, values in per_function.items():
        v = np.asarray(values, np.float64)
        out[f"reward_std/{name}"] = float(np.nanstd(v)) if np.isfinite(v).any() else float("nan")
    return out


def sample_rows(step: int, *, prompts: Sequence[str], completions: Sequence[str], per_function: Mapping[str, Any],
                totals: Sequence[float], advantages: Sequence[float], nfe: Sequence[float],
                lengths: Sequence[int], terminated: Sequence[bool], count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows as JSON-ready dicts (row = global row index; ``per_function`` values in global
    row order, the text lists for the first rows at least)."""
    n = min(count, len(completions))
    rows = []
    for i in range(n):
        rewards = {k: (None if not np.isfinite(float(v[i])) else float(v[i])) for k, v in per_function.items()}
        rows.append({"step": int(step), "row": i, "prompt": prompts[i], "completion": completions[i],
                     "rewards": rewards, "reward": float(totals[i]), "advantage": float(advantages[i]),
                     "nfe": int(nfe[i]), "length": int(lengths[i]), "truncated": not bool(terminated[i])})
    return rows


def append_samples(directory: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows to ``<directory>/samples.jsonl`` (flushed and synced: a killed run keeps what it logged)."""
    with open(Path(directory) / SAMPLES_FILE, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_samples(directory: Path, step: int) -> None:
    """Drop samples past ``step`` (logged after the checkpoint a run resumes from) and a torn last line."""
    path = Path(directory) / SAMPLES_FILE
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
        if row.get("step", 0) <= step:
            keep.append(ln)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in keep))
    tmp.replace(path)


SAMPLE_COLUMNS = ("row", "prompt", "completion", "reward", "advantage", "nfe", "length", "truncated")


def table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, data) of the samples: the fixed columns, then one column per reward term."""
    terms = sorted({k for r in rows for k in r["rewards"]})
    columns = [*SAMPLE_COLUMNS, *(f"reward/{t}" for t in terms)]
    data = [[r[c] for c in SAMPLE_COLUMNS] + [r["rewards"].get(t) for t in terms] for r in rows]
    return columns, data


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The samples as a Markdown table (TensorBoard's text plugin renders it)."""
    columns, data = table(rows)

    def cell(v: Any) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)
