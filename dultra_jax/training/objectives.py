"""The GRPO objectives, one table (``grpo.loss`` picks a row) over the same rollout -> score -> advantages.

An objective is its loss (a :data:`dultra_jax.training.step.LossFn` factory), how a decoded, scored rollout
becomes the loss's input (``pack``), and which input each of the rollout's ``grpo.num_iterations`` optimiser
updates takes (``for_iteration``). Adding one is one :func:`register` call, not a branch in the trainer.

- ``replay`` (default): dUltra's objective, the replayed decoding trajectory with one clipped sequence-level
  ratio per iteration (:mod:`dultra_jax.training.grpo`); rollouts must use the planner.
- ``diffu_grpo``: d1's one-step per-token estimate with random prompt masking and a per-token clipped ratio
  (:mod:`dultra_jax.training.diffu_grpo`); rollouts may use any reveal rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flax import nnx

from dultra_jax.training import diffu_grpo, grpo
from dultra_jax.training.step import LossFn


@dataclass(frozen=True)
class Objective:
    loss: Callable[[grpo.GRPOLossConfig, str], LossFn]  # (loss config, train.trainable)
    pack: Callable[[Any, Any, np.ndarray], tuple[Any, int]]  # (trainer, RolloutResult, advantages [B])
    for_iteration: Callable[[Any, int], Any]  # (packed, update index) -> the micro-batches of that update
    replays_trajectory: bool  # True: the loss replays the planner's recorded decisions


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, objective: Objective) -> Objective:
    if name in OBJECTIVES:
        raise ValueError(f"GRPO objective {name!r} is already registered")
    OBJECTIVES[name] = objective
    return objective


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown grpo.loss {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


# ------------------------------------------------------------------------------------------- replay
def _pack_replay(trainer, ro, adv: np.ndarray):
    return trainer._pack(ro, adv)


register("replay", Objective(loss=grpo.make_loss, pack=_pack_replay, for_iteration=lambda packed, it: packed,
                             replays_trajectory=True))


# ------------------------------------------------------------------------------------------- diffu-GRPO
def _estimate(model, batch: diffu_grpo.DiffuBatch):
    graphdef, state = nnx.split(model)
    return diffu_grpo.micro_batch_logps(graphdef, state, batch)


def _pack_diffu(trainer, ro, adv: np.ndarray) -> tuple[list[diffu_grpo.DiffuBatch], int]:
    """One micro-batched :class:`DiffuBatch` per optimiser update of this rollout: update ``it`` draws its prompt
    noise from (train.seed, step, it); with mu > 1 its old estimate is the rollout policy's on that noise (d1's
    per-iteration mask seeds), and with beta > 0 its reference estimate too."""
    from dultra_jax.parallel import local_rows
    from dultra_jax.training.trainer import _split_micro

    cfg, g = trainer.cfg, trainer.cfg.grpo
    n, p = cfg.train.micro_batches, ro.ids.shape[1]
    mine = trainer._my_rows(len(adv))
    tokens = local_rows(ro.res.tokens)
    eos = tuple(sorted({int(trainer.mcfg.eos_token_id)} | ({int(trainer.tokenizer.eos_token_id)}
                                                           if trainer.tokenizer.eos_token_id is not None else set())))
    canvas_mask = np.concatenate([ro.mask, np.ones((len(ro.ids), g.gen_length), np.int32)], axis=1)
    base = dict(input_ids=tokens.astype(np.int32), completion_mask=diffu_grpo.completion_mask(tokens[:, p:], eos),
                advantages=adv[mine].astype(np.float32), attention_mask=canvas_mask)
    updates = []
    for it in range(g.num_iterations):
        noise = diffu_grpo.prompt_noise((cfg.train.seed, trainer.step, it), len(adv), p, g.p_mask_prompt)[mine]
        batch = _split_micro(diffu_grpo.DiffuBatch(prompt_noise=noise, **base), n, plan=trainer.plan)
        if g.num_iterations > 1:
            batch = replace(batch, old_logps=_estimate(trainer._current_model(), batch))
        if trainer.ref_trainable is not None:
            ref = nnx.merge(trainer.graphdef, trainer.ref_trainable, trainer.frozen)
            batch = replace(batch, ref_logps=_estimate(ref, batch))
        updates.append(batch)
    return updates, int(ro.res.trajectory.num_steps) if ro.res.trajectory is not None else 0


register("diffu_grpo", Objective(loss=diffu_grpo.make_loss, pack=_pack_diffu,
                                 for_iteration=lambda packed, it: packed[it], replays_trajectory=False))

