"""Rewards: math correctness (math-verify in time-bounded workers), format, code execution in a sandbox,
decoding speed, teacher log-probability, and the registry that weights them per dataset.

Submodules import their heavy dependencies lazily, so ``import dultra_jax.rewards`` is cheap.
"""

from dultra_jax.rewards.format import answer_format, code_fence_format, think_format
from dultra_jax.rewards.registry import (
    REWARDS,
    RewardConfigError,
    RewardContext,
    RewardInputs,
    RewardOutput,
    RewardSet,
    build_rewards,
    load_reward_config,
)
from dultra_jax.rewards.speed import step_penalty

__all__ = [
    "REWARDS", "RewardConfigError", "RewardContext", "RewardInputs", "RewardOutput", "RewardSet", "answer_format",
    "build_rewards", "code_fence_format", "load_reward_config", "step_penalty", "think_format",
]
