"""FLOP cost of one decoding iteration, for ``DecodeResult.equivalent_forwards`` and the benchmarks.

An iteration's cost counts everything it computes: the backbone over its window (all positions when
uncached), the LM head on the block and, for the planner, its head (queries restricted to the block,
keys/values over the head's window). :func:`iteration_cost` expresses it in full backbone forwards over the
canvas; ``equivalent_forwards`` divides a cached iteration's cost by the exact iteration's of the same
strategy, so an exact iteration counts 1 and a cached planner iteration counts its backbone and head windows.
"""

from __future__ import annotations

from dultra_jax.config import ModelConfig


def layer_flops(cfg: ModelConfig, queries: int, kv_positions: int, keys: int) -> float:
    """One transformer block: q/o projections and the MLP at ``queries`` positions, k/v projections at
    ``kv_positions``, attention scores and mixing of ``queries`` over ``keys``."""
    d, f = cfg.d_model, cfg.mlp_hidden_size
    return (2.0 * queries * (2 * d * d + 3 * d * f) + 2.0 * kv_positions * 2 * d * cfg.kv_dim
            + 4.0 * queries * keys * d)


def backbone_flops(cfg: ModelConfig, length: int, window: int) -> float:
    """The backbone run on ``window`` positions of a ``length`` canvas (window = length: a full forward)."""
    return cfg.n_layers * layer_flops(cfg, window, window, length)


def head_flops(cfg: ModelConfig, length: int, window: int, block: int) -> float:
    """The planner head on ``window`` positions with the last layer's queries restricted to ``block``."""
    n = cfg.num_head_layers
    return (n - 1) * layer_flops(cfg, window, window, length) + layer_flops(cfg, block, window, length)


def iteration_cost(cfg: ModelConfig, length: int, window: int, block: int, planner: bool,
                   head_window: int | None = None) -> float:
    """An iteration's FLOPs in full backbone forwards (backbone window + LM head on the block [+ head])."""
    flops = backbone_flops(cfg, length, window) + 2.0 * block * cfg.d_model * cfg.embedding_size
    if planner:
        flops += head_flops(cfg, length, window if head_window is None else head_window, block)
    return flops / backbone_flops(cfg, length, length)


def lm_head_flops(cfg: ModelConfig, positions: int) -> float:
    """The LM head (hidden -> vocabulary logits) at ``positions`` positions."""
    return 2.0 * positions * cfg.d_model * cfg.embedding_size


def forward_flops(cfg: ModelConfig, length: int, logit_positions: int, batch: int = 1) -> float:
    """One full backbone forward over [batch, length] with LM-head logits at ``logit_positions`` per row (the
    benchmarks' roofline; attention scores included)."""
    return batch * (backbone_flops(cfg, length, length) + lm_head_flops(cfg, logit_positions))


def planner_flops(cfg: ModelConfig, length: int, batch: int = 1, block: int | None = None) -> float:
    """The planner head over [batch, length] (its last layer's queries on ``block`` positions; default all)."""
    return batch * head_flops(cfg, length, length, length if block is None else block)


def iteration_flops(cfg: ModelConfig, length: int, block: int, planner: bool, batch: int = 1) -> float:
    """One exact (uncached) decode iteration over [batch, length]: the backbone, logits on the block and, for
    the planner, its head with queries restricted to the block (what :func:`iteration_cost` counts as 1)."""
    return batch * iteration_cost(cfg, length, length, block, planner) * backbone_flops(cfg, length, length)
