"""Parallelism: one program over a device mesh (GSPMD), configured by name.

- :class:`MeshConfig` / :func:`make_mesh`: a ``(data, fsdp, tensor)`` mesh from sizes such as
  ``"data=1,fsdp=8,tensor=1"`` (``-1`` = the rest of the devices), with ``AxisType.Auto`` axes (GSPMD style;
  jax's default Explicit axes reject the embedding gather).
- :data:`DEFAULT_RULES`: the one table from the logical axis names every parameter and activation carries
  (``dultra_jax.model.axes``) to mesh axes. Weights are FSDP-sharded on their ``embed`` axis and
  tensor-parallel on heads / MLP / vocab; the batch is split over ``data`` x ``fsdp``.
- :class:`ShardingPlan`: mesh + rules. It creates the model already sharded (jitted init with
  ``out_shardings``; no host or device ever holds the full model), gives abstract sharded states for AOT
  compiles, places host batches, and jits entry points with explicit in/out shardings under the mesh and rules
  (which also turns on the activation constraints at block boundaries).

Multi-host set-up and host-side row reads live in :mod:`dultra_jax.multihost` (re-exported here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dultra_jax.config import ModelConfig
from dultra_jax.model import axes
from dultra_jax.model.axes import OnUneven, Rules, ShardingRuleError, logical_to_spec
from dultra_jax.model.dultra import DUltra
from dultra_jax.multihost import distributed_settings, gather_rows, initialize_distributed, is_primary, local_rows

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "MeshConfig", "MeshError", "MeshJit", "MissingAxesError", "ShardingPlan",
    "ShardingRuleError", "distributed_settings", "gather_rows", "initialize_distributed", "is_primary",
    "local_rows", "make_mesh", "param_logical_axes", "shardings_of",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: Rules = (
    # activations
    (axes.ACT_BATCH, BATCH_AXES),
    (axes.ACT_LENGTH, None),
    (axes.ACT_EMBED, None),  # the residual stream is replicated over `tensor` (Megatron-style)
    (axes.ACT_HEADS, "tensor"),
    (axes.ACT_KV_HEADS, "tensor"),
    (axes.ACT_HEAD_DIM, None),
    (axes.ACT_MLP, "tensor"),
    (axes.ACT_VOCAB, "tensor"),
    # parameters
    (axes.VOCAB, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.MLP, "tensor"),
    (axes.ADALN, "tensor"),
    (axes.LAYERS, None),  # scanned: each step slices one layer (and all-gathers its fsdp shards)
    (axes.NORM, None),
    (axes.TIME_FEATURES, None),
    (axes.PLANNER_OUT, None),
    (axes.MASK_TYPES, None),
)


class MeshError(ValueError):
    """A mesh specification that is malformed or does not match the available devices."""


class MissingAxesError(ValueError):
    """Parameters without logical axis names: they would silently be replicated."""


# ------------------------------------------------------------------------------------------------- mesh
@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be ``-1`` ("the rest of the devices")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | Mapping[str, int] | MeshConfig | None) -> MeshConfig:
        """From ``"data=2,fsdp=-1,tensor=1"`` (missing axes take the defaults), a mapping, or a MeshConfig."""
        if spec is None:
            return cls()
        if isinstance(spec, MeshConfig):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                name, eq, value = part.partition("=")
                if not eq:
                    raise MeshError(f"mesh spec {spec!r}: expected AXIS=SIZE items like 'data=1,fsdp=8,tensor=1'")
                items[name.strip()] = value.strip()
            spec = items
        unknown = sorted(set(spec) - set(MESH_AXES))
        if unknown:
            raise MeshError(f"mesh spec {_show(spec)}: unknown axis {unknown}; the axes are {list(MESH_AXES)}")
        sizes = {}
        for name, value in spec.items():
            try:
                sizes[name] = int(value)
            except (TypeError, ValueError):
                raise MeshError(
                    f"mesh spec {_show(spec)}: size of {name!r} must be an integer, got {value!r}"
                ) from None
        # fsdp takes "the rest" by default, unless another axis already does.
        defaults = {"data": 1, "fsdp": 1 if -1 in sizes.values() else -1, "tensor": 1}
        cfg = cls(**{**defaults, **sizes})
        bad = [f"{n}={s}" for n, s in cfg.sizes.items() if s == 0 or s < -1]
        if bad:
            raise MeshError(f"mesh spec {cfg}: sizes must be positive or -1 (the rest), got {', '.join(bad)}")
        if list(cfg.sizes.values()).count(-1) > 1:
            raise MeshError(f"mesh spec {cfg}: at most one axis may be -1")
        return cfg

    @property
    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Concrete sizes for ``n_devices``; the error names the spec and the device count."""
        sizes = self.sizes
        fixed = int(np.prod([s for s in sizes.values() if s != -1]))
        if -1 in sizes.values():
            if n_devices % fixed:
                raise MeshError(
                    f"mesh {self}: {n_devices} devices are not divisible by the fixed axes' product {fixed}"
                )
            sizes = {n: (n_devices // fixed if s == -1 else s) for n, s in sizes.items()}
        elif fixed != n_devices:
            raise MeshError(f"mesh {self} needs {fixed} devices but {n_devices} are available")
        return sizes

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.sizes.items())


def _show(spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items()) if isinstance(spec, Mapping) else repr(spec)


def make_mesh(spec: str | Mapping[str, int] | MeshConfig | Mesh | None = None, *, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axes over ``devices`` (default: all devices of all hosts)."""
    if isinstance(spec, Mesh):
        return spec
    cfg = MeshConfig.parse(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ------------------------------------------------------------------------------------------- parameters
def param_logical_axes(state: nnx.State) -> dict[tuple, tuple | None]:
    """Flat path -> logical axis names of every variable in ``state`` (None where a variable has none)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        out[tuple(path)] = tuple(names) if names else None
    return out


def _mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


@dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the logical-axis rules: every sharding the project uses comes from here."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def __post_init__(self) -> None:
        named = {a for _, t in self.rules for a in ([t] if isinstance(t, str) else (t or ()))}
        absent = sorted(named - set(self.mesh.axis_names))
        if absent:  # otherwise those rules would silently replicate
            raise MeshError(f"the sharding rules use mesh axes {absent} that mesh {dict(self.mesh.shape)} lacks")

    @classmethod
    def create(cls, mesh: str | Mapping | MeshConfig | Mesh | None = None, rules: Rules | None = None,
               *, devices=None) -> ShardingPlan:
        return cls(make_mesh(mesh, devices=devices), tuple(rules) if rules is not None else DEFAULT_RULES)

    # ---------------------------------------------------------------------------------------- specs
    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None, *,
             on_uneven: OnUneven = "raise", what: str = "array") -> PartitionSpec:
        """PartitionSpec for logical ``names``; with ``shape`` the divisibility is checked (see ``on_uneven``)."""
        if shape is None:  # shape-free: every size "divides" a zero-length placeholder
            return logical_to_spec(names, [0] * len(names), _mesh_shape(self.mesh), self.rules, what=what)
        return logical_to_spec(names, shape, _mesh_shape(self.mesh), self.rules, on_uneven=on_uneven, what=what)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None, *,
                 on_uneven: OnUneven = "raise") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape, on_uneven=on_uneven))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_shards(self) -> int:
        """How many ways the batch axis is split (rows must be a multiple of it)."""
        spec = self.spec([axes.ACT_BATCH])[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return int(np.prod([self.mesh.shape[n] for n in names]))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """[B, L, ...] inputs: batch split over data x fsdp, the rest replicated."""
        return self.sharding([axes.ACT_BATCH] + [None] * (ndim - 1))

    def param_shardings(self, state: nnx.State, *, on_uneven: OnUneven = "replicate") -> nnx.State:
        """A NamedSharding per variable of ``state`` (same tree), from its logical names and the rules.

        Raises :class:`MissingAxesError` listing every variable without logical names. Dimensions the mesh
        does not divide are replicated (``replicate``, tiny test models) or rejected (``raise``).
        """
        missing = [
            "/".join(map(str, p)) for p, n in param_logical_axes(state).items() if n is None
        ]
        if missing:
            raise MissingAxesError(
                f"{len(missing)} parameter(s) carry no logical axis names (add axes.partitioned(...) to their "
                f"initialiser): {missing}"
            )
        flat = []
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata()["out_sharding"]
            what = "parameter " + "/".join(map(str, path))
            spec = logical_to_spec(names, var.shape, _mesh_shape(self.mesh), self.rules, on_uneven=on_uneven,
                                   what=what)
            flat.append((path, var.replace(NamedSharding(self.mesh, spec))))
        return nnx.from_flat_state(flat)

    # ---------------------------------------------------------------------------------------- models
    def abstract_model(self, cfg: ModelConfig, *, seed: int = 0, on_uneven: OnUneven = "replicate",
                       **model_kwargs) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, state of ShapeDtypeStructs carrying their NamedShardings): no memory allocated anywhere."""
        abstract = nnx.eval_shape(lambda: DUltra(cfg, rngs=nnx.Rngs(seed), **model_kwargs))
        graphdef, state = nnx.split(abstract)
        shardings = self.param_shardings(state, on_uneven=on_uneven)
        return graphdef, jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
        )

    def create_model(self, cfg: ModelConfig, *, seed: int = 0, on_uneven: OnUneven = "replicate",
                     **model_kwargs) -> DUltra:
        """Initialise a :class:`DUltra` directly into its shardings (each device computes only its shards).

        Values equal an unsharded ``DUltra(cfg, rngs=nnx.Rngs(seed))`` (JAX's partitionable threefry).
        """
        graphdef, abstract = self.abstract_model(cfg, seed=seed, on_uneven=on_uneven, **model_kwargs)
        shardings = shardings_of(abstract)

        @partial(jax.jit, out_shardings=shardings)
        def init():
            return nnx.state(DUltra(cfg, rngs=nnx.Rngs(seed), **model_kwargs))

        with self.context():
            state = init()
        return nnx.merge(graphdef, state)

    def shard_state(self, state: nnx.State, *, on_uneven: OnUneven = "replicate") -> nnx.State:
        """Move an existing state onto the mesh by its logical names."""
        return jax.device_put(state, self.param_shardings(state, on_uneven=on_uneven))

    def params_replicated_over(self, axis: str) -> ShardingPlan:
        """The same mesh with parameters no longer split over ``axis`` (activations keep their rules): e.g. a
        rollout copy of the weights replicated over ``fsdp``, so decoding needs no all-gather per iteration."""
        def drop(target):
            if target == axis:
                return None
            if isinstance(target, tuple):
                kept = tuple(t for t in target if t != axis)
                return kept or None
            return target
        rules = tuple((name, target if name.startswith("activation_") else drop(target)) for name, target in self.rules)
        return ShardingPlan(self.mesh, rules)

    def shard_model(self, model: DUltra, *, on_uneven: OnUneven = "replicate") -> DUltra:
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, self.shard_state(state, on_uneven=on_uneven))

    # ---------------------------------------------------------------------------------------- data
    def shard_batch(self, x: Any, names: Sequence[str | None] | None = None) -> jax.Array:
        """Place a host batch (numpy, [B, ...]) on the mesh by logical names (default: batch-sharded rows).

        On several hosts ``x`` is this host's rows (``make_array_from_process_local_data``); on one host it is
        the whole batch. The row count must divide by :attr:`batch_shards`.
        """
        x = np.asarray(x)
        names = list(names) if names is not None else [axes.ACT_BATCH] + [None] * (x.ndim - 1)
        rows = x.shape[0] * (jax.process_count() if names[0] == axes.ACT_BATCH else 1)
        if names[0] == axes.ACT_BATCH and rows % self.batch_shards:
            raise ShardingRuleError(
                f"batch of {rows} rows cannot be split {self.batch_shards} ways over mesh axes "
                f"{self.spec([axes.ACT_BATCH])[0]}; use a multiple of {self.batch_shards}"
            )
        sharding = self.sharding(names)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    # ---------------------------------------------------------------------------------------- jit
    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh + logical rules: inside it the model's activation constraints are live."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def jit(self, fn: Callable, *, in_shardings=None, out_shardings=None, static_argnums=(),
            donate_argnums=(), optional_last: bool = False) -> MeshJit:
        """``jax.jit`` with explicit shardings whose tracing, calls and ``lower`` run inside :meth:`context`.

        ``optional_last``: the last positional argument may be omitted (it is then passed as None).
        """
        kw = {}
        if in_shardings is not None:
            kw["in_shardings"] = in_shardings
        if out_shardings is not None:
            kw["out_shardings"] = out_shardings
        jitted = jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums, **kw)
        n_args = len(in_shardings) if optional_last and isinstance(in_shardings, tuple) else None
        return MeshJit(self, jitted, n_args)

    def forward_fn(self, graphdef: nnx.GraphDef, state_shardings: nnx.State) -> MeshJit:
        """``(state, input_ids[, attention_mask]) -> (logits, hidden)`` with explicit in/out shardings."""
        ids = self.batch_sharding(2)
        outs = (self.sharding([axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB]),
                self.sharding(list(axes.BLD)))

        def fwd(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state)(input_ids, attention_mask)

        return self.jit(fwd, in_shardings=(state_shardings, ids, ids), out_shardings=outs, optional_last=True)

    def planner_fn(self, graphdef: nnx.GraphDef, state_shardings: nnx.State) -> MeshJit:
        """``(state, hidden, timestep, mask_index[, attention_mask]) -> planner logits [B, L]``."""
        rows = self.batch_sharding(2)

        def plan(state, hidden, timestep, mask_index, attention_mask):
            return nnx.merge(graphdef, state).planner_logits(hidden, timestep, mask_index, attention_mask)

        return self.jit(
            plan, in_shardings=(state_shardings, self.batch_sharding(3), self.batch_sharding(1), rows, rows),
            out_shardings=rows, optional_last=True,
        )


def shardings_of(abstract: Any) -> Any:
    """The sharding tree of an abstract (ShapeDtypeStruct) or concrete tree."""
    return jax.tree.map(lambda a: a.sharding, abstract)


class MeshJit:
    """A jitted function that always traces, runs and lowers under its plan's mesh and rules."""

    def __init__(self, plan: ShardingPlan, jitted, n_args: int | None = None):
        self.plan = plan
        self.jitted = jitted
        self.n_args = n_args

    def _pad(self, args: tuple) -> tuple:
        if self.n_args is not None and len(args) == self.n_args - 1:
            return (*args, None)
        return args

    def __call__(self, *args):
        with self.plan.context():
            return self.jitted(*self._pad(args))

    def lower(self, *args):
        with self.plan.context():
            return self.jitted.lower(*self._pad(args))
