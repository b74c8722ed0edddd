"""Checkpoint I/O: the original's HF safetensors (both ways) and our converted orbax directories."""

from dultra_jax.checkpoints.errors import CheckpointError
from dultra_jax.checkpoints.hf import export_hf, load_hf, param_specs
from dultra_jax.checkpoints.store import (
    convert,
    is_converted,
    load,
    load_converted,
    recorded_task,
    save_converted,
)

__all__ = [
    "CheckpointError", "convert", "export_hf", "is_converted", "load", "load_converted", "load_hf",
    "param_specs", "recorded_task", "save_converted",
]
