"""Logical axis names for parameters and activations, and the activation sharding constraint.

Every parameter carries logical names (``out_sharding`` metadata, e.g. ``("embed", "mlp")``); the rules table
in :mod:`dultra_jax.parallel` maps them to mesh axes, so changing the parallelism is a rules edit, not a model
edit. The names are *logical*, so eager sharding is switched off on the parameters (flax would otherwise treat
them as mesh axes); sharded creation goes through ``dultra_jax.parallel``.

:func:`constrain` pins an activation's sharding at block boundaries. It is a no-op unless a mesh is set
(``jax.set_mesh``) *and* logical rules are active (``nnx.logical_axis_rules``), so single-device code is
untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

# ----------------------------------------------------------------------------------------- parameter axes
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"  # q / attention-output feature axis (n_heads * head_dim, head-major)
KV_HEADS = "kv_heads"  # k / v feature axis (n_kv_heads * head_dim)
MLP = "mlp"
LAYERS = "layers"  # the stacked layer axis of a BlockStack
NORM = "norm"
TIME_FEATURES = "time_features"  # sinusoidal timestep features of the planner
ADALN = "adaln"  # AdaLN modulation output ([scale | shift], 2 * d_model)
PLANNER_OUT = "planner_out"  # the planner's single output logit
MASK_TYPES = "mask_types"  # rows of the planner's 2-row mask / block embeddings

# ----------------------------------------------------------------------------------------- activation axes
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_HEAD_DIM = "activation_head_dim"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"

PARAM_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, MLP, LAYERS, NORM, TIME_FEATURES, ADALN, PLANNER_OUT, MASK_TYPES)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_HEAD_DIM, ACT_MLP, ACT_VOCAB)

# The layer axis name the BlockStack's vmap (creation) and scan (forward) insert / remove.
LAYER_TRANSFORM = {nnx.PARTITION_NAME: LAYERS}

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
OnUneven = Literal["replicate", "raise"]


def partitioned(init, *names: str | None):
    """Wrap a parameter initialiser so the Param carries logical axis ``names`` (one per dimension)."""
    return nnx.with_metadata(init, out_sharding=tuple(names), eager_sharding=False)


def param_metadata(*names: str | None) -> dict:
    """Keyword metadata for a ``nnx.Param(...)`` created directly (same meaning as :func:`partitioned`)."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


class ShardingRuleError(ValueError):
    """A logical axis without a rule, or a dimension the mesh cannot divide (with ``on_uneven='raise'``)."""


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Rules | Mapping,
    *,
    on_uneven: OnUneven = "replicate",
    what: str = "array",
) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis ``names`` under ``rules`` on a mesh of ``mesh_shape``.

    Mesh axes absent from the mesh are ignored and a mesh axis is used at most once (first dimension wins).
    A dimension that the mapped mesh axes do not divide keeps the longest prefix of them that does
    (``replicate``), or raises (``raise``), so an 8B plan never silently replicates a weight.
    """
    rules = dict(rules)
    if len(names) != len(shape):
        raise ShardingRuleError(f"{what}: {len(names)} logical axes {tuple(names)} for a {len(shape)}-d shape {shape}")
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names, strict=True):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingRuleError(
                f"{what}: logical axis {name!r} has no entry in the sharding rules (known: {sorted(rules)})"
            )
        target = rules[name]
        axes = [target] if isinstance(target, str) else list(target or ())
        axes = [a for a in axes if a in mesh_shape and a not in used]
        while axes and dim % _prod(mesh_shape[a] for a in axes):
            if on_uneven == "raise":
                sizes = ",".join(f"{a}={mesh_shape[a]}" for a in axes)
                raise ShardingRuleError(
                    f"{what}: dimension {dim} (logical {name!r}) is not divisible by mesh axes {sizes}"
                )
            axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def active_rules() -> tuple:
    """The logical axis rules of the enclosing ``nnx.logical_axis_rules`` context (empty outside one)."""
    return tuple(flax_spmd.get_logical_axis_rules() or ())


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity without a mesh or without active rules."""
    rules = active_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules, what="activation")
    return jax.lax.with_sharding_constraint(x, spec)


BLD = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)  # residual stream [B, L, D]


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p
