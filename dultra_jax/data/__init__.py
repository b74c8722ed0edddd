"""Task records, the original's prompts, and grain pipelines for training (reading a task: dultra_jax.tasks)."""

from dultra_jax.data.pipeline import PromptPipeline, load_iterator_state, save_iterator_state, tokenize_prompts
from dultra_jax.data.prompts import PROMPT_MODES, STYLES, conversation, render_chat
from dultra_jax.data.tasks import DataError, Example, find_example

__all__ = [
    "PROMPT_MODES", "STYLES", "DataError", "Example", "PromptPipeline", "conversation", "find_example",
    "load_iterator_state", "render_chat", "save_iterator_state",
    "tokenize_prompts",
]
