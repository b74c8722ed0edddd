"""Tasks: one :class:`Task` record per task (:data:`TASKS`), and the verifier pools their scorers share."""

from dultra_jax.tasks.loading import load_task, make_example, read_rows, task_spec
from dultra_jax.tasks.table import (
           SYNTHETIC_DEFAULT_N,
           TASKS,
           TOKENIZER_FILES,
           Task,
           get_task,
           task_names,
           worked_solution,
)
from dultra_jax.tasks.verifiers import Verifiers

__all__ = ["SYNTHETIC_DEFAULT_N", "TASKS", "TOKENIZER_FILES", "Task", "Verifiers", "get_task", "load_task",
           "make_example", "read_rows", "task_names", "task_spec", "worked_solution"]
