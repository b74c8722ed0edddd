"""Flax NNX modules of the dUltra model (LLaDA backbone + unmasking planner head)."""

from dultra_jax.model.backbone import LLaDA
from dultra_jax.model.dultra import DUltra, forward, planner_forward
from dultra_jax.model.planner_head import PlannerHead

__all__ = ["DUltra", "LLaDA", "PlannerHead", "forward", "planner_forward"]
