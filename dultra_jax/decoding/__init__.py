"""Decoding: one jitted loop (``generate``) for the dUltra planner and the confidence baselines (each row's NFE
is counted in the loop; effective tokens and TPF are :mod:`dultra_jax.accounting`), the engine that feeds its
rows from a queue (``DecodeEngine``; ``generate_many`` drives it over a list: docs/engine.md), and the
trajectory replay GRPO trains on."""

from dultra_jax.decoding.continuous import ManyResult, generate_many
from dultra_jax.decoding.engine import DecodeEngine, Finished
from dultra_jax.decoding.loop import (
    STRATEGIES,
    DecodeConfig,
    DecodeResult,
    Trajectory,
    generate,
    pad_prompts,
)
from dultra_jax.decoding.trajectory import trajectory_logps

__all__ = [
    "STRATEGIES", "DecodeConfig", "DecodeEngine", "DecodeResult", "Finished", "ManyResult", "Trajectory", "generate",
    "generate_many", "pad_prompts", "trajectory_logps",
]
