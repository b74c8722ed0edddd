"""Decoding settings of one evaluation run, and the factor sweep built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from dultra_jax.config import ConfigError
from dultra_jax.decoding.flags import DEFAULT_DECODE, as_kwargs
from dultra_jax.decoding.loop import DecodeConfig

SWEEP_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)
SWEEP_STRATEGIES = ("factor", "planner")


class EvalError(ConfigError):
    """A bad evaluation argument or input; the message names it."""


BATCHING = ("continuous", "batched")


# DecodeConfig fields the harness sets per call, or that have no meaning for a scored run
_PER_CALL = ("return_trajectory", "on_block", "schedule", "max_iterations")


@dataclass(frozen=True)
class EvalSettings:
    """One run's settings: how it decodes (the one :class:`~dultra_jax.decoding.DecodeConfig`) and how the
    harness batches. :meth:`create` takes them flat (``gen_length=16, batch_size=2``)."""

    decode: DecodeConfig = DEFAULT_DECODE
    batch_size: int = 8  # rows per decode call; with continuous batching, the slots
    pad_multiple: int = 64
    # continuous: decoding.generate_many refills a slot as soon as its prompt is done (single-device runs);
    # batched: sync batches of generate (always used with a mesh plan, which generate_many does not take)
    batching: str = "continuous"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EvalError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.pad_multiple < 1:
            raise EvalError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.batching not in BATCHING:
            raise EvalError(f"unknown batching {self.batching!r}; choose one of {list(BATCHING)}")
        bad = [k for k in _PER_CALL if getattr(self.decode, k) != getattr(DEFAULT_DECODE, k)]
        if bad:
            raise EvalError(f"evaluation sets {bad} itself; leave them at their defaults in the DecodeConfig")

    @classmethod
    def create(cls, decode: DecodeConfig = DEFAULT_DECODE, **settings) -> EvalSettings:
        """Settings from flat keywords: DecodeConfig fields replace those of ``decode``, the rest are ours."""
        names = {f.name for f in fields(DecodeConfig)}
        changes = {k: settings.pop(k) for k in list(settings) if k in names}
        try:
            decode = replace(decode, **changes)
        except ValueError as e:
            raise EvalError(str(e)) from e
        return cls(decode=decode, **settings)

    def decode_kwargs(self) -> dict[str, Any]:
        """The decode settings as :func:`~dultra_jax.decoding.generate` keywords (the per-call ones left out)."""
        return {k: v for k, v in as_kwargs(self.decode).items() if k not in _PER_CALL}

    @property
    def series(self) -> str:
        """The method a plot draws as one line (the planner's reveal rule matters, its factor is a point)."""
        d = self.decode
        return f"planner-{d.reveal}" if d.strategy == "planner" else d.strategy

    @property
    def point_label(self) -> str:
        d = self.decode
        if d.strategy == "planner" and d.planner_temperature is not None:
            return f"f={d.factor:g} pt={d.planner_temperature:g}"
        if d.strategy in ("planner", "factor"):
            return f"f={d.factor:g}"
        if d.strategy == "threshold":
            return f"t={d.threshold:g}"
        return f"steps={d.steps or d.gen_length}"

    @property
    def label(self) -> str:
        d = self.decode
        cache = "" if d.cache == "none" else f" {d.cache}-cache"
        return f"{self.series} {self.point_label} b{d.block_length}{cache}"

    def to_dict(self) -> dict[str, Any]:
        """Flat: the decode settings, then ours (what run.json and summary.json record; :meth:`create` reads it)."""
        return {**self.decode_kwargs(), "batch_size": self.batch_size, "pad_multiple": self.pad_multiple,
                "batching": self.batching}


def sweep_settings(base: EvalSettings, factors: Sequence[float] = SWEEP_FACTORS) -> list[tuple[str, EvalSettings]]:
    """The original's factor sweeps: the Fast-dLLM factor baseline and the planner scaled by the same factors."""
    if not factors:
        raise EvalError("the factor sweep needs at least one factor")
    return [(f"{s}-f{f:g}", replace(base, decode=replace(base.decode, strategy=s, factor=float(f))))
            for s in SWEEP_STRATEGIES for f in factors]
