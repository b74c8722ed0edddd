"""Weights & Biases logging beside JSONL and TensorBoard: the same metric rows, mirrored into a wandb run.

Optional (``pip install 'dultra-jax[wandb]'``); switched on with ``logging.wandb: true`` in a training config
(``--wandb`` on the CLI) and ``dultra eval --wandb``. wandb's own environment decides the rest: ``WANDB_MODE``
(``offline`` writes the run under ``WANDB_DIR`` for a later ``wandb sync``), ``WANDB_PROJECT``, ``WANDB_ENTITY``,
``WANDB_API_KEY``. Only process 0 of a multi-process run logs. A training run keeps its wandb run id in its
output directory, so a resumed run continues the same wandb run rather than starting another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dultra_jax.atomic import write_atomic
from dultra_jax.config import ConfigError

DEFAULT_PROJECT = "dultra-jax"
RUN_ID_FILE = "wandb_run_id"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _scalars(row: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric, finite-or-not scalar entries of a metrics row (strings, lists, bools are not metrics)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    """One wandb run; :meth:`log` takes the rows MetricsWriter / the evaluation produce."""

    def __init__(self, directory: str | Path, *, job_type: str, name: str | None = None,
                 project: str | None = None, config: Mapping[str, Any] | None = None, resumable: bool = False):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("wandb logging was requested but wandb is not installed: "
                              "pip install 'dultra-jax[wandb]' (or drop --wandb / logging.wandb)") from e
        import jax

        self.run = None
        if jax.process_index() != 0:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumable and id_file.is_file() else None
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=name or directory.name,
            job_type=job_type, config=dict(config or {}), dir=os.environ.get("WANDB_DIR") or str(directory),
            id=run_id, resume="allow" if resumable else None, reinit="create_new",
        )
        if resumable and run_id is None:
            write_atomic(id_file, self.run.id + "\n")

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, row: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        values = _scalars(row)
        values.pop("step", None)
        if values:
            self.run.log(values, step=step)

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        """A table (e.g. a rollout's sampled completions) under ``key`` at ``step``."""
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in data])}, step=step)

    def summarize(self, values: Mapping[str, Any]) -> None:
        """Final numbers of the run (shown in wandb's run table)."""
        if self.run is not None:
            for k, v in _scalars(values).items():
                self.run.summary[k] = v

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def log_eval_summaries(summaries: list[dict[str, Any]], out_dir: str | Path, *, name: str | None = None,
                       config: Mapping[str, Any] | None = None) -> str | None:
    """One wandb run (job type ``eval``) for a ``dultra eval`` invocation: its summary's accuracy, NFE, TPF and
    throughput as the run summary; for a factor sweep, each run's figures under ``<label>/`` at its own step.
    Returns the wandb run's directory (None on processes other than 0)."""
    sink = WandbSink(out_dir, job_type="eval", name=name, config=config)
    try:
        if len(summaries) == 1:
            sink.log(summaries[0], step=0)
            sink.summarize(summaries[0])
        for i, s in enumerate(summaries if len(summaries) > 1 else []):
            sink.log({f"{s['label']}/{k}": v for k, v in _scalars(s).items()}, step=i)
            sink.summarize({f"{s['label']}/{k}": v for k, v in _scalars(s).items()})
        return sink.run.dir if sink.active else None
    finally:
        sink.close()
