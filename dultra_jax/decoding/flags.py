"""Decode settings on the command line, derived from :class:`~dultra_jax.decoding.DecodeConfig`'s fields.

The flag's name, type, choices and default come from the field; this module adds only the help text and the
default lengths. A field without help here is not a flag (callbacks, trajectories, internal switches).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from dultra_jax.decoding.loop import DecodeConfig

# What the commands decode by default (the original's evaluation lengths).
DEFAULT_DECODE = DecodeConfig(gen_length=256, block_length=32)

HELP: dict[str, str] = {
    "strategy": "reveal rule: planner (the learned head), threshold or factor (confidence rules), fixed (steps "
                "per block)",
    "reveal": "the planner's decision rule: bernoulli (the original's evaluation) or topk",
    "gen_length": "tokens to generate (a multiple of --block-length)",
    "block_length": "tokens per block, decoded left to right",
    "temperature": "token sampling temperature (0: the most likely token)",
    "threshold": "threshold strategy: reveal tokens more confident than this, in (0, 1]",
    "factor": "factor strategy and planner: scales how many tokens a step reveals (> 0)",
    "steps": "fixed strategy: total steps over the generation (default: gen_length)",
    "cache": "block KV cache: none (exact), prefix, dual (approximate, faster)",
    "early_stop": "stop a row once it has emitted end-of-text",
    "planner_temperature": "planner strategy: reveal probability sigmoid(logit / T) (default: T = 1)",
    "refresh": "with a cache: full (every block's first iteration recomputes the whole canvas) or suffix (from "
               "the previous block on: cheaper, approximate; docs/kv-cache.md)",
    "layer_loop": "scan (one stacked layer loop: least memory) or unrolled (each layer's weights read in place: "
                  "fewer bytes per cached iteration)",
    "refresh_rows": "per-row KV cache (continuous batching): rows whose block starts that get their cache "
                    "refresh forward in one iteration (default: a quarter of the slots)",
}


def flag_fields() -> list[dataclasses.Field]:
    """The DecodeConfig fields that are flags, in the dataclass's order."""
    return [f for f in dataclasses.fields(DecodeConfig) if f.name in HELP]


def _flag_type(hint) -> tuple[Any, list | None]:
    """(argparse type, choices) of a field's annotation: ``int | None`` -> int, ``Literal[...]`` -> choices."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), list(args)
    return hint, None


def add_decode_flags(parser: argparse.ArgumentParser, defaults: DecodeConfig = DEFAULT_DECODE) -> None:
    """``--gen-length``, ``--strategy``, ... for every :data:`HELP` field, defaults from ``defaults``."""
    hints = typing.get_type_hints(DecodeConfig)
    group = parser.add_argument_group("decoding (dultra_jax.decoding.DecodeConfig)")
    for f in flag_fields():
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        kind, choices = _flag_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag, action="store_true", default=default, help=HELP[f.name])
        else:
            shown = "" if default is None else f" (default {default})"
            group.add_argument(flag, type=kind, choices=choices, default=default, help=HELP[f.name] + shown)


def decode_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags of :func:`add_decode_flags` as DecodeConfig keyword arguments."""
    return {f.name: getattr(args, f.name) for f in flag_fields()}


def decode_config_from_args(args: argparse.Namespace, **extra) -> DecodeConfig:
    """The DecodeConfig of the parsed flags (``extra``: fields the command sets itself); ValueError names a bad
    value."""
    return DecodeConfig(**decode_flag_values(args), **extra)


def as_kwargs(cfg: DecodeConfig) -> dict[str, Any]:
    """Every field of ``cfg`` as keyword arguments of :func:`~dultra_jax.decoding.generate`."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
