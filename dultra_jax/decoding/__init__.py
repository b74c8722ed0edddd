"""Decoding: one jitted loop (``generate``) for the dUltra planner and the confidence baselines, continuous
batching over it (``generate_many``), NFE/TPF accounting, and the trajectory replay GRPO trains on."""

from dultra_jax.decoding.continuous import ManyResult, generate_many
from dultra_jax.decoding.loop import (
    STRATEGIES,
    DecodeConfig,
    DecodeResult,
    Trajectory,
    effective_tokens,
    generate,
    pad_prompts,
    tokens_per_forward,
)
from dultra_jax.decoding.trajectory import trajectory_logps

__all__ = [
    "STRATEGIES", "DecodeConfig", "DecodeResult", "ManyResult", "Trajectory", "effective_tokens", "generate",
    "generate_many", "pad_prompts",
    "tokens_per_forward", "trajectory_logps",
]
