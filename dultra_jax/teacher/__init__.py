"""The autoregressive teacher of the distillation reward: a Qwen2-family causal LM and its HF loader."""

from dultra_jax.teacher.loader import LOGICAL_AXES, load_qwen2, logical_axes, resolve_teacher_path, shard_teacher
from dultra_jax.teacher.qwen2 import Qwen2Config, Qwen2ForCausalLM, forward, next_token_logprobs

__all__ = [
    "LOGICAL_AXES", "Qwen2Config", "Qwen2ForCausalLM", "forward", "load_qwen2", "logical_axes", "shard_teacher",
    "next_token_logprobs", "resolve_teacher_path",
]
