"""Speed reward: penalise decoding steps, as the original's ``gen_step_reward`` does.

A trajectory is the list, per decoding iteration, of the positions revealed in it (``sampling_traj``); in a
lock-step batch, rows that are already done record empty steps, which cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

STEP_SCALE = 50.0  # "sum" mode: -(steps with >= 1 reveal) / 50


def step_penalty(trajectory: Sequence[Sequence[int]], mode: str = "sum", scale: float = STEP_SCALE) -> float:
    """One completion's speed reward.

    - ``sum`` (used in training): -(number of steps that revealed at least one position) / scale (50).
    - ``sqrt``: -sum over steps of sqrt(#revealed).
    - ``sqrt_sum``: ``sqrt`` divided by the total number of revealed positions (0 when nothing was revealed).
    """
    sizes = [len(step) for step in trajectory]
    if mode == "sum":
        return -sum(1 for n in sizes if n > 0) / scale
    if mode == "sqrt":
        return -sum(math.sqrt(n) for n in sizes)
    if mode == "sqrt_sum":
        total = sum(sizes)
        return -sum(math.sqrt(n) for n in sizes) / total if total else 0.0
    raise ValueError(f"unknown step-penalty mode {mode!r}; choose one of 'sum', 'sqrt', 'sqrt_sum'")


def trajectory_from_reveals(reveal_mask) -> list[list[int]]:
    """Convert per-step boolean reveal masks [steps, length] (the decoder's record) to position lists."""
    import numpy as np

    mask = np.asarray(reveal_mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"reveal_mask must be [steps, length], got shape {mask.shape}")
    return [np.flatnonzero(row).tolist() for row in mask]
