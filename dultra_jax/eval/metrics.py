"""Speed and accuracy arithmetic of an evaluation, kept pure so it can be checked on hand-made rows.

NFE, effective tokens and TPF are defined in :mod:`dultra_jax.accounting` (this module aggregates them).
Throughput:

- positions/s: generated canvas positions (rows x gen_length, prompt tokens never counted) per second of decode
  wall time; effective tokens/s: effective tokens per second of the same wall time. Compilation is excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dultra_jax.accounting import tpf


def distribution(values: Iterable[float]) -> dict[str, float]:
    """mean, p50, p90, min, max of ``values`` (NaN for an empty list)."""
    arr = np.asarray(list(values), np.float64)
    if arr.size == 0:
        return {k: math.nan for k in ("mean", "p50", "p90", "min", "max")}
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "min": float(arr.min()), "max": float(arr.max())}


def accuracy_over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per seed (rows carry ``seed`` and ``correct``), their mean and sample std (ddof=1; 0 for one seed)."""
    per: dict[int, list[float]] = {}
    for r in rows:
        per.setdefault(int(r["seed"]), []).append(1.0 if r["correct"] else 0.0)
    per_seed = {str(s): float(np.mean(v)) for s, v in sorted(per.items())}
    accs = np.asarray(list(per_seed.values()), np.float64)
    return {
        "accuracy": float(accs.mean()) if accs.size else math.nan,
        "accuracy_std": float(accs.std(ddof=1)) if accs.size > 1 else 0.0,
        "accuracy_per_seed": per_seed,
    }


def speed_summary(rows: Sequence[Mapping[str, Any]], batches: Sequence[Mapping[str, Any]], gen_length: int
                  ) -> dict[str, Any]:
    """NFE/TPF over sample ``rows`` (``nfe``, ``effective_tokens``, ``equivalent_forwards``) and throughput over
    decode ``batches`` (``rows`` = real rows in the call, ``time_s`` = its wall time, ``effective_tokens``)."""
    nfe = [float(r["nfe"]) for r in rows]
    eff = [float(r["effective_tokens"]) for r in rows]
    wall = float(sum(b["time_s"] for b in batches))
    positions = float(sum(b["rows"] for b in batches)) * gen_length
    eff_total = float(sum(b["effective_tokens"] for b in batches))
    return {
        "mean_nfe": float(np.mean(nfe)) if nfe else math.nan,
        "tpf": tpf(eff, nfe),
        "mean_effective_tokens": float(np.mean(eff)) if eff else math.nan,
        "mean_equivalent_forwards": float(np.mean([float(r.get("equivalent_forwards", r["nfe"])) for r in rows]))
        if rows else math.nan,
        "nfe_distribution": distribution(nfe),
        "tpf_distribution": distribution(e / n for e, n in zip(eff, nfe, strict=True) if n > 0),
        "decode_time_s": wall,
        "positions_per_s": positions / wall if wall > 0 else math.nan,
        "effective_tokens_per_s": eff_total / wall if wall > 0 else math.nan,
    }
