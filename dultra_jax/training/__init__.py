"""Training: masked-diffusion SFT, planner pre-training and GRPO as pure losses + one jitted optax step."""

from dultra_jax.training.grpo import GRPOLossConfig, Rollout, clipped_objective, group_advantages, grpo_loss
from dultra_jax.training.planner_pretrain import factor_targets, noise_batch, planner_loss, weighted_bce
from dultra_jax.training.sft import sft_loss
from dultra_jax.training.step import OptimConfig, make_optimizer, make_train_step, split_trainable

__all__ = [
    "GRPOLossConfig", "OptimConfig", "Rollout", "clipped_objective", "factor_targets", "group_advantages",
    "grpo_loss", "make_optimizer", "make_train_step", "noise_batch", "planner_loss", "sft_loss", "split_trainable",
    "weighted_bce",
]
