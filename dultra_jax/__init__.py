"""dultra-jax: dUltra (LLaDA + learned unmasking planner) in JAX/Flax NNX.

    model = dultra_jax.load(path, dtype="bf16")       # HF checkpoint dir, converted dir or hub id org/name[@rev]
    logits, hidden = model(input_ids)                   # [B, L, V], [B, L, D] (post final norm)
    plan = model.planner_logits(hidden, timestep, mask_index)   # float32 [B, L]
"""

from dultra_jax.checkpoints import CheckpointError, convert, export_hf, load
from dultra_jax.config import ConfigError, ModelConfig, UnsupportedConfigError, preset
from dultra_jax.model import DUltra, forward, planner_forward

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DUltra", "ModelConfig", "UnsupportedConfigError", "convert",
    "export_hf", "forward", "load", "planner_forward", "preset",
]
