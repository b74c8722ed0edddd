"""Scoring completions as the original's evaluation does (one verifier pool kept open across batches).

What counts as correct is the task's own scorer (:attr:`dultra_jax.tasks.Task.score`): ``dultra score`` and
training-time evaluation use the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dultra_jax.data.tasks import DataError, Example
from dultra_jax.eval.settings import EvalError
from dultra_jax.tasks import Verifiers, get_task


class Scorer:
    """Scores completions of one task, keeping its verifier pool open across calls (the harness scores every
    batch as it finishes). Use as a context manager; :func:`score` is the one-shot form.

    Per completion: ``correct`` (bool), ``status`` and the scorer's details.
    """

    def __init__(self, task: str, *, workers: int | None = None):
        try:
            self.task = get_task(task)  # any task: training-time evaluation scores the training-only ones too
        except DataError as e:
            raise EvalError(str(e)) from None
        self.workers = workers
        self._verifiers = Verifiers(workers=workers)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._verifiers.close()

    def __call__(self, examples: Sequence[Example], completions: Sequence[str]) -> list[dict[str, Any]]:
        if len(examples) != len(completions):
            raise EvalError(f"{len(completions)} completions for {len(examples)} problems")
        return self.task.score(self._verifiers, examples, completions)


def score(task: str, examples: Sequence[Example], completions: Sequence[str], *, workers: int | None = None
          ) -> list[dict[str, Any]]:
    """Per completion: ``correct`` (bool), ``status`` and the scorer's details, as the original's evaluation scores."""
    with Scorer(task, workers=workers) as scorer:
        return scorer(examples, completions)
