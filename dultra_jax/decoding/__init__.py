"""Decoding: one jitted loop (``generate``) for the dUltra planner and the confidence baselines (each row's NFE
is counted in the loop; effective tokens and TPF are :mod:`dultra_jax.accounting`), continuous batching over it
(``generate_many``), and the trajectory replay GRPO trains on."""

from dultra_jax.decoding.continuous import ManyResult, generate_many
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
    "STRATEGIES", "DecodeConfig", "DecodeResult", "ManyResult", "Trajectory", "generate", "generate_many",
    "pad_prompts", "trajectory_logps",
]
