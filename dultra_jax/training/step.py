"""One pure, jitted optimiser step for any of our losses, with micro-batch accumulation and a NaN guard.

``step(trainable, frozen, opt_state, microbatches, rng) -> (trainable, opt_state, metrics)``: gradients are
taken w.r.t. ``trainable`` only (the frozen part is under ``stop_gradient`` and never enters the optimiser
state), summed over the leading micro-batch axis with ``lax.scan`` and averaged, clipped by global norm and
applied with AdamW. A step whose loss or gradient is not finite leaves parameters and optimiser state
untouched and reports ``skipped = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.GraphDef, tuple, object, jax.Array], tuple[jax.Array, dict]]
Trainable = Literal["all", "planner", "backbone"]


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 5e-6
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_learning_rate: float = 0.0
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = False  # HF Trainer's convention: no decay on norm scales and biases
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose constant, cosine or linear")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.total_steps - cfg.warmup_steps, 1),
                                           alpha=cfg.min_learning_rate / cfg.learning_rate)
    else:
        main = optax.linear_schedule(cfg.learning_rate, cfg.min_learning_rate,
                                     max(cfg.total_steps - cfg.warmup_steps, 1))
    if cfg.warmup_steps <= 0:
        return main
    warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


NO_DECAY_NAMES = ("scale", "bias")  # norm scales and biases (the last path entry of the parameter)


def _last_name(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    names = [n for n in names if n != "value"]  # an nnx.Variable leaf's own attribute
    return names[-1] if names else ""


def weight_decay_mask(params):
    """True for the parameters weight decay applies to: all but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_name(path) not in NO_DECAY_NAMES, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    mask = None if cfg.decay_norms_and_biases else weight_decay_mask
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=mask),
    )


def trainable_filter(which: Trainable):
    """nnx filter of the parameters that train: everything, only the planner head, or only the backbone."""
    if which == "all":
        return nnx.Param
    if which in ("planner", "backbone"):
        return nnx.All(nnx.Param, lambda path, _: bool(path) and path[0] == which)
    raise ValueError(f"unknown trainable set {which!r}; choose all, planner or backbone")


def split_trainable(model: nnx.Module, which: Trainable):
    """(graphdef, trainable state, frozen state)."""
    return nnx.split(model, trainable_filter(which), ...)


def init_optimizer(tx: optax.GradientTransformation, trainable, plan=None):
    """Optimiser state for ``trainable``; on a mesh, moments inherit the parameters' shardings and the
    remaining leaves (step counters) are replicated on the mesh."""
    opt_state = tx.init(trainable)
    if plan is None:
        return opt_state

    def place(a):
        s = getattr(a, "sharding", None)
        on_mesh = isinstance(s, jax.sharding.NamedSharding) and s.mesh == plan.mesh
        return a if on_mesh else jax.device_put(a, plan.replicated)

    return jax.tree.map(place, opt_state)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    plan=None, trainable=None, frozen=None, opt_state=None):
    """A jitted pure step over micro-batches stacked on the leading axis of every leaf of the batch.

    With a :class:`dultra_jax.parallel.ShardingPlan` (and example ``trainable``/``frozen``/``opt_state`` placed
    on its mesh), the step is jitted with explicit in/out shardings for the states (the batch keeps the
    sharding it was placed with) and traced under the plan's mesh and logical rules, so the model's activation
    constraints apply; parameters and optimiser state keep their shardings across steps.
    """

    def train_step(trainable, frozen, opt_state, microbatches, rng):
        frozen = jax.lax.stop_gradient(frozen)
        n_micro = jax.tree.leaves(microbatches)[0].shape[0]

        def one(carry, inputs):
            grads_acc, loss_acc, metrics_acc = carry
            mb, key = inputs
            (loss, metrics), grads = jax.value_and_grad(
                lambda t: loss_fn(graphdef, (t, frozen), mb, key), has_aux=True
            )(trainable)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, loss_acc + loss, metrics_acc), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        metrics0 = jax.eval_shape(lambda: loss_fn(graphdef, (trainable, frozen),
                                                  jax.tree.map(lambda a: a[0], microbatches), rng)[1])
        metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0)
        keys = jax.random.split(rng, n_micro)
        (grads, loss, metrics), _ = jax.lax.scan(one, (zeros, jnp.float32(0.0), metrics0), (microbatches, keys))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        loss = loss / n_micro
        metrics = jax.tree.map(lambda m: m / n_micro, metrics)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_trainable = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_trainable, trainable)
        new_opt = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_opt, opt_state)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
        return new_trainable, new_opt, metrics

    if plan is None:
        return jax.jit(train_step, donate_argnums=(0, 2))
    from dultra_jax.parallel import shardings_of

    tr_s, fr_s, opt_s = shardings_of(trainable), shardings_of(frozen), shardings_of(opt_state)
    return plan.jit(train_step, in_shardings=(tr_s, fr_s, opt_s, None, plan.replicated),
                    out_shardings=(tr_s, opt_s, plan.replicated), donate_argnums=(0, 2))
