"""What a run leaves on disk: ``samples.jsonl`` (appended as batches finish), the resume check, the merge of
several processes' rows, and ``summary.json`` computed from the rows."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax.atomic import write_atomic
from dultra_jax.eval import metrics
from dultra_jax.eval.env import device_name, git_commit, git_dirty
from dultra_jax.eval.settings import EvalError, EvalSettings
from dultra_jax.multihost import gather_objects

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
    """Every process's rows on every process; identity on one."""
    return gather_objects(rows, default=_json_default)


def _run_info(task: str, settings, examples) -> dict[str, Any]:
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
    speed = metrics.speed_summary(rows, list(batches.values()), settings.decode.gen_length)
    per_process: dict[int, float] = {}
    for b in batches.values():
        per_process[b["process"]] = per_process.get(b["process"], 0.0) + b["time_s"]
    if len(per_process) > 1:  # concurrent processes: wall time is the slowest one's, not the sum
        wall = max(per_process.values())
        speed["decode_time_s"] = wall
        speed["positions_per_s"] = len(rows) * settings.decode.gen_length / wall if wall > 0 else float("nan")
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
        "gen_length": settings.decode.gen_length, "block_length": settings.decode.block_length,
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


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One line per run: label, accuracy +- std, mean NFE, TPF, positions/s, effective tokens/s."""
    lines = [f"{'run':<34} {'accuracy':>15} {'NFE':>7} {'TPF':>6} {'pos/s':>9} {'eff tok/s':>10}"]
    for s in summaries:
        acc = f"{100 * s['accuracy']:.1f} +- {100 * s['accuracy_std']:.1f}"
        lines.append(f"{s['label']:<34} {acc:>15} {s['mean_nfe']:7.2f} {s['tpf']:6.2f} {s['positions_per_s']:9.1f} "
                     f"{s['effective_tokens_per_s']:10.1f}")
    return "\n".join(lines)
