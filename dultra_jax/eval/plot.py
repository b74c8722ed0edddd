"""Accuracy against NFE from evaluation summaries, one labelled point per run (the paper's figure).

Each run of ``dultra eval`` is a point (mean NFE, accuracy, with the std over seeds as an error bar); runs of
the same method (e.g. the points of a factor sweep) are joined by a line; one panel per task. Also reads the
demo's ``summary.json`` (its baseline sweeps as curves, the planner before/after GRPO as points; or an older
demo's list of rows with ``method``, ``accuracy``, ``nfe``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dultra_jax.atomic import atomic_path
from dultra_jax.eval.settings import EvalError

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def load_points(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Points from summary files and/or directories (searched recursively for ``summary.json``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("summary.json"))
            if not found:
                raise EvalError(f"--summaries: {p} holds no summary.json")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise EvalError(f"--summaries: not found: {p}")
    if not files:
        raise EvalError("--summaries: give at least one summary file or directory")
    points = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise EvalError(f"--summaries: {f} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"--summaries: {f} is not readable JSON: {e}") from e
        points += _points(data, f)
    return points


def _points(data: Any, f: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict) and "accuracy" in data and "mean_nfe" in data:
        name = data.get("label") or f.parent.name
        model = str(data.get("model") or "")
        return [{"task": str(data.get("task", "?")), "series": str(data.get("series") or name),
                 "model": "/".join(Path(model).parts[-2:]) if model else "",
                 "label": str(data.get("point_label") or name), "accuracy": float(data["accuracy"]),
                 "std": float(data.get("accuracy_std") or 0.0), "nfe": float(data["mean_nfe"]),
                 "gen_length": data.get("gen_length"), "block_length": data.get("block_length")}]
    if isinstance(data, dict) and {"rows", "sweep"} <= data.keys():  # the demo's summary
        return demo_points(data)
    if isinstance(data, list) and data and all(isinstance(r, dict) and {"method", "accuracy", "nfe"} <= r.keys()
                                               for r in data):
        return [{"task": str(r.get("task", "demo")), "series": str(r["method"]), "model": "", "label": str(r["method"]),
                 "accuracy": float(r["accuracy"]), "std": float(r.get("accuracy_std") or 0.0),
                 "nfe": float(r["nfe"]), "gen_length": None, "block_length": None} for r in data]
    raise EvalError(f"--summaries: {f} is not an evaluation summary (an object with 'accuracy' and 'mean_nfe', or "
                    "a list of rows with 'method', 'accuracy', 'nfe')")


def demo_points(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``dultra demo``'s summary as accuracy-vs-NFE points: one curve per baseline sweep, the planner before and
    after GRPO (lives here, not in the demo, so that evaluation never imports the training pipeline)."""
    names = {"planner_before_grpo": "planner before GRPO", "planner_after_grpo": "planner after GRPO"}
    shape = next((r for r in summary["rows"] if "gen_length" in r), {})
    gen, block = shape.get("gen_length"), shape.get("block_length")
    pts = [{"task": "synthetic addition", "series": r["strategy"], "model": "", "label": r["method"].split()[-1],
            "accuracy": r["accuracy"], "std": 0.0, "nfe": r["nfe"], "gen_length": gen, "block_length": block}
           for r in summary["sweep"]]
    pts += [{"task": "synthetic addition", "series": names[r["method"]], "model": "", "label": names[r["method"]],
             "accuracy": r["accuracy"], "std": 0.0, "nfe": r["nfe"], "gen_length": gen, "block_length": block}
            for r in summary["rows"] if r["method"] in names]
    return pts


def plot_accuracy_vs_nfe(points: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str | None = None,
                         name: str = "accuracy_vs_nfe") -> list[Path]:
    """Write ``out_dir/<name>.png`` and ``.svg``; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise EvalError("nothing to plot: no summaries")
    tasks = sorted({p["task"] for p in points})
    points = [dict(p) for p in points]
    for task in tasks:  # runs of several models on one task: one line per (method, model)
        mine = [p for p in points if p["task"] == task]
        if len({p.get("model", "") for p in mine}) > 1:
            for p in mine:
                p["series"] = f"{p['series']} [{p['model'] or '?'}]"
    fig = Figure(figsize=(5.6 * len(tasks), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    all_series = sorted({p["series"] for p in points})
    colors = {s: f"C{i % 10}" for i, s in enumerate(all_series)}
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(all_series)}
    for ax, task in zip(axes, tasks, strict=True):
        mine = [p for p in points if p["task"] == task]
        for series in sorted({p["series"] for p in mine}):
            pts = sorted((p for p in mine if p["series"] == series), key=lambda p: p["nfe"])
            xs, ys = [p["nfe"] for p in pts], [100 * p["accuracy"] for p in pts]
            errs = [100 * p["std"] for p in pts]
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, color=colors[series], marker=markers[series],
                        linestyle="-" if len(pts) > 1 else "none", capsize=3, label=series)
            at: dict[tuple[float, float], list[str]] = {}  # runs landing on the same point share one label
            for p, x, y in zip(pts, xs, ys, strict=True):
                at.setdefault((round(x, 6), round(y, 6)), []).append(p["label"])
            for k, ((x, y), labels) in enumerate(at.items()):  # alternate above/below so neighbours stay legible
                ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=(4, 4 if k % 2 == 0 else -11),
                            fontsize=7, color=colors[series])
        shapes = {(p["gen_length"], p["block_length"]) for p in mine}
        sub = ""
        if len(shapes) == 1 and None not in next(iter(shapes)):
            g, b = next(iter(shapes))
            sub = f" (gen {g}, block {b})"
        ax.set_title(f"{task}{sub}")
        ax.set_xlabel("mean NFE per sample (lower is faster)")
        ax.set_ylabel("accuracy (%)")
        ax.margins(x=0.12, y=0.08)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("png", "svg"):
        target = out / f"{name}.{fmt}"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
        written.append(target)
    return written
