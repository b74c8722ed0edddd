"""The resumable training loop for SFT, planner pre-training and GRPO, as one program over one or many processes.

One loop for all three modes; what differs is one row of :data:`MODES` = (build the data, make a batch, the
loss). Data (grain, checkpointed iterator; each process reads only its own rows) -> batch -> one jitted pure
step -> metrics (JSONL, TensorBoard when tensorboardX is installed; process 0 writes) -> orbax checkpoint
(every N optimiser updates, keep K, async, atomic, written by all processes) -> periodic eval. Re-running in an
output directory that holds checkpoints resumes from the latest one with the same data order, rng and step
(a resume whose config changes the model or the data order is refused). SIGTERM / SIGINT save a checkpoint and
stop. Non-finite steps are skipped (params untouched) and the run aborts after ``train.max_bad_steps`` of them
in a row.

GRPO steps count optimiser updates (TRL's convention): a rollout feeds ``grpo.num_iterations`` updates, each
its own step (schedule, log row, ``max_steps``). A rollout is: rollout (decode with the recorded trajectory) ->
score (rewards of this process's rows) -> advantages (over the gathered groups) -> pack (trim the recorded
iterations to a bucket of the rollout's ``num_steps``, split into micro-batches, place on the mesh). Prompts are
padded to a multiple of ``task.pad_to_multiple``, so the rollout and the train step compile once per
(padded length, bucket).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from dultra_jax import accounting
from dultra_jax.checkpoints.hf import parse_dtype
from dultra_jax.checkpoints.hub import resolve_model_path
from dultra_jax.config import ConfigError, ModelConfig, preset
from dultra_jax.decoding import generate
from dultra_jax.model.dultra import DUltra
from dultra_jax.multihost import gather_rows, initialize_distributed, is_primary, local_rows
from dultra_jax.outputs import check_run_dir
from dultra_jax.tasks import get_task
from dultra_jax.training import grpo as grpo_mod
from dultra_jax.training import objectives
from dultra_jax.training import samples as samples_mod
from dultra_jax.training.config import RunConfig
from dultra_jax.training.planner_pretrain import noise_batch, planner_loss
from dultra_jax.training.sft import sft_loss
from dultra_jax.training.step import (
    LossFn,
    init_optimizer,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    split_trainable,
)

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint of the last finished step was saved before stopping."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after step {step}; a checkpoint was "
                         "saved: re-run the same command to resume")
        self.signum, self.step = signum, step


# ------------------------------------------------------------------------------------------- pieces
def build_model(cfg: RunConfig) -> DUltra:
    m = cfg.model
    dtype, param_dtype = parse_dtype(m.dtype), parse_dtype(m.param_dtype)
    if m.path:
        import dultra_jax

        return dultra_jax.load(m.path, dtype=dtype, param_dtype=param_dtype, remat=m.remat, seed=m.seed)
    return DUltra(model_config(cfg), dtype=dtype, param_dtype=param_dtype, remat=m.remat, rngs=nnx.Rngs(m.seed))


def model_config(cfg: RunConfig) -> ModelConfig:
    """The model's config without building it (checked against the run config before anything is compiled)."""
    m = cfg.model
    if m.path:
        return ModelConfig.from_json_file(resolve_model_path(m.path) / "config.json")
    overrides = {**get_task(cfg.task.name).model_overrides, **m.overrides}
    return preset(m.preset, **overrides)


def check_fits(cfg: RunConfig, mcfg: ModelConfig) -> None:
    """Run settings the model's shape rules out, refused before anything is built."""
    if cfg.train.mode == "grpo" and mcfg.max_sequence_length - cfg.grpo.gen_length < 1:
        raise ConfigError(f"grpo.gen_length ({cfg.grpo.gen_length}) leaves no room for a prompt in the model's "
                          f"max_sequence_length ({mcfg.max_sequence_length}); lower grpo.gen_length or raise "
                          "model.overrides.max_sequence_length (configs/tiny_cpu.yaml sets both)")


def build_tokenizer(cfg: RunConfig):
    task = get_task(cfg.task.name)
    if task.build_tokenizer is not None and cfg.task.tokenizer is None:
        return task.build_tokenizer()
    src = cfg.task.tokenizer or (str(resolve_model_path(cfg.model.path)) if cfg.model.path else None)
    if src is None:
        raise ConfigError("task.tokenizer (or model.path with tokenizer files) is needed for task " + cfg.task.name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def load_examples(cfg: RunConfig, split: str) -> list:
    t = cfg.task
    task = get_task(t.name, "train")
    style = "train" if split == "train" else "eval"
    if task.hub is None:  # generated: train/eval sizes and the operand range come from the task section
        return task.examples(style, limit=t.num_train if split == "train" else t.num_eval, max_operand=t.max_operand)
    return task.examples(style, split=t.split, data_file=t.data_file, prompt_mode=t.prompt_mode, limit=t.limit)


def answer_of(example) -> str:
    """Target text for SFT / planner sequences (the task's :meth:`~dultra_jax.tasks.Task.target_text`): the
    synthetic answer, or the task's worked reference solution
    (MATH ``solution``, HumanEval ``canonical_solution``, MBPP ``code``, GSM8K's full ``answer``)."""
    return get_task(example.task).target_text(example)


def encode_sequences(examples, tokenizer, gen_length: int, eos_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[N, P + G] = left-padded chat prompt | answer + <|eot_id|> + end-of-text padding; returns (ids,
    attention mask, P). The mask is 0 on the prompt's left padding only: the end-of-text tokens after the
    answer are targets the model learns to emit, as in LLaDA's SFT."""
    from dultra_jax.data.prompts import render_chat

    prompts = [tokenizer(render_chat(tokenizer, list(e.messages)), add_special_tokens=False)["input_ids"]
               for e in examples]
    eot = "<|eot_id|>" if "<|eot_id|>" in tokenizer.get_vocab() else ""
    answers = [tokenizer(answer_of(e) + eot, add_special_tokens=False)["input_ids"][:gen_length] for e in examples]
    p = max(len(x) for x in prompts)
    ids = np.full((len(examples), p + gen_length), eos_id, np.int32)
    mask = np.ones_like(ids)
    for i, (pr, an) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, p - len(pr):p] = pr
        ids[i, p:p + len(an)] = an
        mask[i, :p - len(pr)] = 0
    return ids, mask, p


def sft_batch(ids: np.ndarray, mask: np.ndarray, answer_mask: np.ndarray, row_seeds: np.ndarray
              ) -> dict[str, np.ndarray]:
    """The SFT loss's rows: ids, attention mask, answer mask [B, N] and each row's noise seed [B]."""
    return {"input_ids": ids, "answer_mask": answer_mask, "attention_mask": mask, "row_seed": row_seeds}


def planner_batch(noisy_ids: np.ndarray, block_index: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The planner loss's rows: noised ids, the noised block [B, N] (bool) and the attention mask."""
    return {"input_ids": noisy_ids, "block_index": block_index, "attention_mask": mask}


def sequence_batch_like(mode: str, rows: int, length: int) -> dict[str, np.ndarray]:
    """A zero batch of ``rows`` sequences of ``length`` as the ``sft`` / ``planner`` mode builds it (keys,
    shapes, dtypes): what the memory plan lays out."""
    ids = np.zeros((rows, length), np.int32)
    if mode == "sft":
        return sft_batch(ids, np.ones_like(ids), np.zeros_like(ids), np.zeros(rows, np.int32))
    if mode == "planner":
        return planner_batch(ids, np.zeros((rows, length), bool), np.ones_like(ids))
    raise ValueError(f"mode {mode!r} does not train on sequences (sft, planner)")


def _split_micro(tree, n: int, axis: int = 0, plan=None):
    """Stack ``n`` micro-batches on a new leading axis by splitting ``axis`` (the batch axis) of every leaf;
    with a sharding plan, each leaf is placed with its batch axis split over the mesh. On several processes the
    leaves are this process's rows: micro-batch m is every process's m-th share (the loss sums rows, so the
    update is the same as with one process)."""
    def f(a):
        a = np.asarray(a)
        shape = a.shape[:axis] + (n, a.shape[axis] // n) + a.shape[axis + 1:]
        a = np.moveaxis(a.reshape(shape), axis, 0)
        if plan is None:
            return jnp.asarray(a)
        names = [None] * a.ndim
        names[axis + 1] = "activation_batch"
        return plan.shard_batch(a, names)
    return jax.tree.map(f, tree)


class MetricsWriter:
    """JSONL (always) + TensorBoard (when tensorboardX is importable) + wandb (a ``WandbSink``, when given);
    ``enabled=False`` (processes other than 0) writes nothing."""

    def __init__(self, directory: Path, enabled: bool = True, *, wandb=None):
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = wandb if enabled else None
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter  # optional

            self._tb = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log(row, step=row["step"])

    def write_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A few completions of a rollout: ``samples.jsonl`` (appended), TensorBoard text, a wandb table."""
        if not self.enabled or not rows:
            return
        samples_mod.append_samples(self.path.parent, rows)
        if self._tb is not None:
            self._tb.add_text("samples", samples_mod.markdown(rows), step)
        if self._wandb is not None:
            self._wandb.log_table("samples", *samples_mod.table(rows), step=step)

    def close(self) -> None:
        """Finish the wandb run (JSONL and TensorBoard need nothing)."""
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (from a run killed after its last checkpoint) so a resumed log is clean; a
        torn last line (killed mid-write) is dropped too, a corrupt line elsewhere is an error."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        rows = []
        for i, ln in enumerate(lines):
            try:
                row = json.loads(ln)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    log.warning("dropping the torn last line of %s", self.path)
                    break
                raise ValueError(f"{self.path} line {i + 1} is not JSON ({e}); fix or remove it to resume") from e
            if row["step"] <= step:
                rows.append(ln)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(self.path)


def _wandb_sink(cfg: RunConfig, out: Path):
    """The wandb run of ``logging.wandb`` (resumed with the output directory), or None."""
    if not cfg.logging.wandb:
        return None
    from dultra_jax.wandb_sink import WandbSink

    return WandbSink(out, job_type=cfg.train.mode, name=cfg.logging.wandb_name, project=cfg.logging.wandb_project,
                     config=cfg.to_dict(), resumable=True)


# ------------------------------------------------------------------------------------------- trainer
@dataclass(frozen=True)
class Mode:
    """What one training mode needs: build its data (``trainer -> None``), make a batch of micro-batches and
    stats (``(trainer, rng) -> (batch, stats)``), and its loss (``cfg -> LossFn``)."""

    build_data: Callable[[Trainer], None]
    make_batch: Callable[[Trainer, jax.Array], tuple[Any, dict[str, float]]]
    loss: Callable[[RunConfig], LossFn]


@dataclass
class RolloutResult:
    """A decoded batch: this process's prompt rows (host) and the global decode result."""

    ids: np.ndarray  # [B_local, P]
    mask: np.ndarray  # [B_local, P]
    res: Any  # DecodeResult (global arrays)
    seconds: float


@dataclass
class Scores:
    """Rewards of this process's rows and the gathered totals of every row."""

    local: Any  # RewardOutput of this process's rows
    total: np.ndarray  # [B] every process's totals, in global row order
    per_function: dict[str, np.ndarray]  # [B] each
    generated: np.ndarray  # [B_local, G]
    texts: list[str]  # [B_local] the completions as the rewards read them


# The config values a checkpoint's parameters and data position depend on: resuming with others is refused.
FINGERPRINT_KEYS = (
    "model.path", "model.preset", "model.overrides", "model.dtype", "model.param_dtype", "model.seed",
    "task.name", "task.data_file", "task.split", "task.limit", "task.prompt_mode", "task.num_train",
    "task.max_operand", "task.max_prompt_length", "train.mode", "train.trainable", "train.seed",
    "train.batch_size", "grpo.num_generations", "sequence.gen_length", "data.source", "data.path", "data.splits",
    "data.max_length",
)


def config_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    out = {}
    for key in FINGERPRINT_KEYS:
        section, name = key.split(".")
        out[key] = d[section][name]
    return json.loads(json.dumps(out, default=str))


class Trainer:
    def __init__(self, cfg: RunConfig, output_dir: str | Path, *, progress: bool = True):
        initialize_distributed()  # several processes: before any other JAX call; a no-op on one
        self.cfg = cfg
        self.out = Path(output_dir).absolute()
        self.primary = is_primary()
        self.num_processes = jax.process_count()
        if self.num_processes > 1 and not cfg.train.mesh:
            raise ConfigError(f"{self.num_processes} processes need train.mesh (e.g. "
                              "train.mesh=data=1,fsdp=-1,tensor=1) so that they run one program over all devices")
        check_run_dir(self.out)
        check_fits(cfg, model_config(cfg))
        if self.primary:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.primary
        self.tokenizer = build_tokenizer(cfg)
        self.plan = None
        if cfg.train.mesh:
            from dultra_jax.parallel import ShardingPlan

            self.plan = ShardingPlan.create(cfg.train.mesh)
        self.rollout_plan = self.plan
        if self.plan is not None and cfg.train.rollout_weights == "replicated_bf16":
            self.rollout_plan = self.plan.params_replicated_over("fsdp")
        self.model = build_model(cfg)
        if self.plan is not None:
            self.model = self.plan.shard_model(self.model)
        self.mode = MODES[cfg.train.mode]
        which = "planner" if cfg.train.mode == "planner" else cfg.train.trainable
        self.graphdef, self.trainable, self.frozen = split_trainable(self.model, which)
        self.tx = make_optimizer(cfg.optim)
        self.schedule = learning_rate_schedule(cfg.optim)
        self.opt_state = init_optimizer(self.tx, self.trainable, self.plan)
        self.mcfg = self.model.cfg
        # ids that are not effective tokens for TPF (end-of-text, pad, MASK, <|eot_id|>), as the evaluation counts
        self.exclude_ids = accounting.model_excluded_ids(self.mcfg, self.tokenizer)
        # ids that end a completion (its length and whether it terminated): end-of-text and <|eot_id|>
        self.stop_ids = accounting.excluded_ids(self.mcfg.eos_token_id, None, self.tokenizer)
        self.streamed = cfg.data.source != "task"  # SFT / planner sequences from a streamed conversation source
        self.examples = [] if self.streamed else load_examples(cfg, "train")
        self._eval_examples = None
        self.mode.build_data(self)
        self.step_fn = make_train_step(self.graphdef, self.mode.loss(cfg), self.tx, plan=self.plan,
                                       trainable=self.trainable, frozen=self.frozen, opt_state=self.opt_state)
        self.ckpt = ocp.CheckpointManager(
            self.out / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep, save_interval_steps=cfg.train.save_every,
                                                 enable_async_checkpointing=cfg.train.async_checkpointing),
        )
        self.metrics = MetricsWriter(self.out, enabled=self.primary,
                                     wandb=_wandb_sink(cfg, self.out) if self.primary else None)
        self.step = 0
        # beta > 0: the reference policy's trainable part; the policy at step 0 unless re-synced every
        # grpo.ref_sync_every updates (checkpointed with the run)
        self.ref_trainable = jax.tree.map(jnp.copy, self.trainable) if self._uses_reference else None
        self._stop_signal: int | None = None
        if self.primary:
            from dultra_jax.atomic import write_atomic

            write_atomic(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str))

    @property
    def _uses_reference(self) -> bool:
        return self.cfg.train.mode == "grpo" and self.cfg.grpo.beta > 0

    def _iteration_batch(self, batch, it: int):
        """The micro-batches of update ``it`` of a rollout (the GRPO objective decides; other modes: ``batch``)."""
        if self.cfg.train.mode != "grpo":
            return batch
        return objectives.objective(self.cfg.grpo.loss).for_iteration(batch, it)

    @property
    def _iterations_per_batch(self) -> int:
        return self.cfg.grpo.num_iterations if self.cfg.train.mode == "grpo" else 1

    # --------------------------------------------------------------------------------------- data
    def _build_sequence_data(self) -> None:
        """SFT / planner sequences: the whole (small) tokenised set on host; grain shuffles row indices and
        each process takes its contiguous share of every batch."""
        import grain

        cfg = self.cfg
        if cfg.train.batch_size % self.num_processes:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the number of "
                              f"processes ({self.num_processes})")
        if self.streamed:  # tokenised a batch at a time, each process its own rows (dultra_jax.data.sources)
            from dultra_jax.data.sources import sequence_batches

            d = cfg.data
            self.iterator = iter(sequence_batches(
                d.source, d.path, d.splits, self.tokenizer, batch_size=cfg.train.batch_size, max_length=d.max_length,
                pad_id=self.mcfg.pad_token_id if self.mcfg.pad_token_id is not None else self.mcfg.eos_token_id,
                shard_index=jax.process_index(), shard_count=self.num_processes))
            return
        self.sequences, self.sequence_mask, self.prompt_len = encode_sequences(
            self.examples, self.tokenizer, cfg.sequence.gen_length, self.mcfg.eos_token_id)
        ds = grain.MapDataset.range(len(self.sequences)).seed(cfg.train.seed).shuffle().repeat(None)
        ds = ds.batch(cfg.train.batch_size, drop_remainder=True)
        self.iterator = iter(ds.to_iter_dataset())

    def _build_prompt_data(self) -> None:
        from dultra_jax.data import PromptPipeline

        cfg = self.cfg
        self.pipeline = PromptPipeline(
            self.examples, self.tokenizer, prompts_per_batch=cfg.train.batch_size,
            num_generations=cfg.grpo.num_generations, seed=cfg.train.seed,
            max_prompt_length=min(cfg.task.max_prompt_length, self.mcfg.max_sequence_length - cfg.grpo.gen_length),
            pad_id=self.mcfg.pad_token_id, pad_to_multiple=cfg.task.pad_to_multiple,
            shard_index=jax.process_index(), shard_count=self.num_processes,
        )
        self.iterator = iter(self.pipeline.dataset())
        self._build_rewards()

    def _build_rewards(self) -> None:
        """Rewards as the run is configured: ``task.prompt_mode`` decides the thinking rewards (think_format),
        ``train.trainable=backbone`` drops the step penalty (the original's freeze_unmasking_head)."""
        from dultra_jax.rewards import registry

        g = self.cfg.grpo
        frozen_head = self.cfg.train.trainable == "backbone"
        task = get_task(self.cfg.task.name)
        if task.reward_weights is not None:  # a task of ours with no rewards.yaml entry: teachers/options from it
            rc = registry.load_reward_config(g.reward_config)
            ctx = registry.RewardContext(rc.get("options"), rc.get("teachers"))
            weights = {**task.reward_weights, **g.reward_weights}
        else:
            rs = registry.build_rewards(self.cfg.task.name, g.reward_config, prompt_mode=self.cfg.task.prompt_mode,
                                        freeze_unmasking_head=frozen_head)
            weights = {**rs.weights, **g.reward_weights}
            ctx = rs.context
        if frozen_head and "step_penalty" in weights:
            weights["step_penalty"] = 0.0
        if self.plan is not None:
            # the distillation teacher is placed with the trainer's plan; on several processes every process
            # scores its own rows in one collective forward over the mesh
            ctx.teacher_plan = self.plan
        terms = []
        for name, w in weights.items():
            opts = ctx.opt(name)
            if name == "step_penalty":
                opts["scale"] = g.step_penalty_scale
            terms.append((name, w, registry.REWARDS[name](ctx, opts)))
        self.rewards = registry.RewardSet(dataset=self.cfg.task.name, terms=terms, context=ctx)

    def _next_batch(self):
        return next(self.iterator)

    def _my_rows(self, n: int) -> slice:
        """This process's contiguous share of ``n`` global rows."""
        k = n // self.num_processes
        return slice(jax.process_index() * k, (jax.process_index() + 1) * k)

    # --------------------------------------------------------------------------------------- batches
    def _current_model(self) -> DUltra:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def _sequence_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(all rows of the batch, this process's share of them as ids and attention mask)."""
        idx = np.asarray(self._next_batch())
        mine = self._my_rows(len(idx))
        return idx, self.sequences[idx[mine]], self.sequence_mask[idx[mine]]

    def _streamed_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids [b, N], attention mask [b, N] (ones: right padding is a target), prompt lengths [b], global row
        positions [b]) of this process's rows of the next streamed batch."""
        batch = self._next_batch()
        ids = np.asarray(batch["input_ids"])
        return ids, np.ones_like(ids), np.asarray(batch["prompt_length"]), np.asarray(batch["row"])

    def _sft_batch(self, rng: jax.Array):
        if self.streamed:
            ids, mask, plen, rows = self._streamed_rows()
            answer = (np.arange(ids.shape[1])[None, :] >= plen[:, None]).astype(ids.dtype)
            seeds = (self.step * self.cfg.train.batch_size + rows).astype(np.int32)
            batch = {"input_ids": ids, "answer_mask": answer, "attention_mask": mask, "row_seed": seeds}
            return _split_micro(batch, self.cfg.train.micro_batches, plan=self.plan), {}
        idx, ids, mask = self._sequence_rows()
        answer = np.zeros_like(ids)
        answer[:, self.prompt_len:] = 1
        # each row's masking noise follows its global position, whatever micro-batch / process holds it
        seeds = (self.step * len(idx) + np.arange(len(idx))[self._my_rows(len(idx))]).astype(np.int32)
        return _split_micro(sft_batch(ids, mask, answer, seeds), self.cfg.train.micro_batches, plan=self.plan), {}

    def _planner_batch(self, rng: jax.Array):
        if self.streamed:  # each row's noise from (seed, step, its global position): any process, same noise
            ids, mask, plen, rows = self._streamed_rows()
            parts = [noise_batch(ids[i:i + 1], plen[i:i + 1], self.mcfg.mask_token_id,
                                 np.random.default_rng([self.cfg.train.seed, self.step, int(r)]),
                                 min_block=self.cfg.sequence.min_block) for i, r in enumerate(rows)]
            batch = {"input_ids": np.concatenate([p[0] for p in parts]),
                     "block_index": np.concatenate([p[1] for p in parts]), "attention_mask": mask}
            return _split_micro(batch, self.cfg.train.micro_batches, plan=self.plan), {}
        idx, _, mask = self._sequence_rows()
        # the noise of every row of the batch (same on all processes), then this process's rows
        host_rng = np.random.default_rng([self.cfg.train.seed, self.step])
        noisy, block = noise_batch(self.sequences[idx], np.full(len(idx), self.prompt_len), self.mcfg.mask_token_id,
                                   host_rng, min_block=self.cfg.sequence.min_block)
        mine = self._my_rows(len(idx))
        batch = planner_batch(noisy[mine], block[mine], mask)
        return _split_micro(batch, self.cfg.train.micro_batches, plan=self.plan), {}

    def _grpo_batch(self, rng: jax.Array):
        batch = self._next_batch()
        ro = self._rollout(batch, rng)
        scores = self._score(batch, ro)
        adv = self._advantages(scores)
        micro, recorded = objectives.objective(self.cfg.grpo.loss).pack(self, ro, adv)
        return micro, self._rollout_stats(ro, scores, adv, recorded)

    def _log_samples(self, ro: RolloutResult, scores: Scores, adv: np.ndarray, nfe: np.ndarray,
                     lengths: np.ndarray, terminated: np.ndarray) -> None:
        """Every ``logging.samples_every`` steps (of the updates this rollout feeds): a few of process 0's rows
        (the first global rows) to samples.jsonl / TensorBoard / wandb."""
        lg = self.cfg.logging
        every, first, last = lg.samples_every, self.step, self.step + self._iterations_per_batch
        if not (self.primary and every and lg.samples_per_step and last // every > first // every):
            return
        n = min(lg.samples_per_step, len(scores.texts))
        prompts = [self.tokenizer.decode(ids[m > 0], skip_special_tokens=True)
                   for ids, m in zip(ro.ids[:n], ro.mask[:n], strict=True)]
        self.metrics.write_samples(first + 1, samples_mod.sample_rows(
            first + 1, prompts=prompts, completions=scores.texts, per_function=scores.per_function,
            totals=scores.total, advantages=adv, nfe=nfe, lengths=lengths, terminated=terminated, count=n))

    # --------------------------------------------------------------------------------------- GRPO pieces
    def _rollout_model(self) -> DUltra:
        """The weights the rollout decodes with: the training ones, or (``train.rollout_weights:
        replicated_bf16``) a bf16 copy replicated over fsdp, rebuilt from the current weights at every rollout
        (so it always follows the last update)."""
        model = self._current_model()
        if self.cfg.train.rollout_weights != "replicated_bf16":
            return model
        return rollout_copy(model, self.rollout_plan, jnp.bfloat16)

    def _rollout(self, batch, rng: jax.Array) -> RolloutResult:
        g = self.cfg.grpo
        ids, mask = _agree_width(np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]),
                                 self.mcfg.pad_token_id)
        rows = len(ids) * self.num_processes
        seeds = np.arange(len(ids)) + jax.process_index() * len(ids) + self.step * rows
        t0 = time.perf_counter()
        # pad_aware always (the mask is an input even when a batch has no padding): one program per shape
        r = g.rollout
        res = generate(self._rollout_model(), ids, attention_mask=mask, gen_length=g.gen_length,
                       block_length=g.block_length, temperature=g.temperature, rng=rng, return_trajectory=True,
                       row_seeds=seeds, plan=self.rollout_plan, factor=g.factor, pad_aware=True,
                       planner_temperature=g.planner_temperature, strategy=r.strategy, reveal=r.reveal,
                       threshold=r.threshold, steps=r.steps)
        jax.block_until_ready(res.tokens)
        return RolloutResult(ids=ids, mask=mask, res=res, seconds=time.perf_counter() - t0)

    def _score(self, batch, ro: RolloutResult) -> Scores:
        """Rewards of this process's rows (where they were decoded); totals gathered for the advantages."""
        from dultra_jax.rewards.registry import RewardInputs
        from dultra_jax.rewards.speed import trajectory_from_reveals

        traj = ro.res.trajectory
        s = int(traj.num_steps)
        reveal = local_rows(traj.reveal, axis=1)[:s]
        gen = local_rows(ro.res.tokens)[:, ro.ids.shape[1]:]
        positions = [trajectory_from_reveals(reveal[:, b]) for b in range(len(gen))]
        texts = self.tokenizer.batch_decode([row[row < len(self.tokenizer)] for row in gen],
                                            skip_special_tokens=True)
        out = self.rewards(RewardInputs(texts, self.pipeline.examples_for(batch), trajectories=positions))
        return Scores(local=out, total=gather_rows(out.total),
                      per_function={k: gather_rows(v) for k, v in out.per_function.items()}, generated=gen,
                      texts=list(texts))

    def _advantages(self, scores: Scores) -> np.ndarray:
        """Group advantages over every row (groups may span processes); [B] in global row order."""
        g = self.cfg.grpo
        return np.asarray(grpo_mod.group_advantages(jnp.asarray(scores.total), g.num_generations, g.scale_rewards))

    def _pack(self, ro: RolloutResult, adv: np.ndarray) -> tuple[grpo_mod.Rollout, int]:
        """The loss's input: recorded iterations trimmed to the bucket of the rollout's ``num_steps`` (one train
        step compile per bucket), this process's rows, split into micro-batches and placed on the mesh."""
        g, n = self.cfg.grpo, self.cfg.train.micro_batches
        traj = ro.res.trajectory
        cap = int(traj.reveal.shape[0])
        recorded = grpo_mod.bucket_for(int(traj.num_steps), cap)
        canvas_mask = np.concatenate([ro.mask, np.ones((len(ro.ids), g.gen_length), np.int32)], axis=1)
        ref = None
        if self._uses_reference:
            from dultra_jax.decoding import trajectory_logps

            ref_model = nnx.merge(self.graphdef, self.ref_trainable, self.frozen)
            place = (lambda a: self.plan.shard_batch(a)) if self.plan is not None else jnp.asarray
            ref = local_rows(trajectory_logps(
                ref_model, ro.res.tokens[:, :ro.ids.shape[1]], traj.reveal[:recorded], traj.proposals[:recorded],
                block_length=g.block_length, planner_temperature=g.planner_temperature, factor=g.factor,
                attention_mask=place(canvas_mask)), axis=1)
        rollout = grpo_mod.trim_rollout(grpo_mod.Rollout(
            prompt_ids=ro.ids, reveal=local_rows(traj.reveal, axis=1), proposals=local_rows(traj.proposals, axis=1),
            old_logps=local_rows(traj.logps, axis=1), advantages=adv[self._my_rows(len(adv))].astype(np.float32),
            attention_mask=canvas_mask, ref_logps=None), recorded)
        rollout.ref_logps = ref

        def split(a, axis=0):
            return None if a is None else _split_micro(a, n, axis, plan=self.plan)

        micro = grpo_mod.Rollout(
            prompt_ids=split(rollout.prompt_ids), reveal=split(rollout.reveal, 1),
            proposals=split(rollout.proposals, 1), old_logps=split(rollout.old_logps, 1),
            advantages=split(rollout.advantages), attention_mask=split(rollout.attention_mask),
            ref_logps=split(rollout.ref_logps, 1),
        )
        return micro, recorded

    def _rollout_stats(self, ro: RolloutResult, scores: Scores, adv: np.ndarray, recorded: int) -> dict[str, float]:
        res = ro.res
        nfe = gather_rows(local_rows(res.nfe)).astype(np.float64)
        eff = gather_rows(accounting.effective_tokens(scores.generated, self.exclude_ids))
        total = scores.total
        stats = {"reward_mean": float(total.mean()), "reward_std": float(total.std()),
                 "nfe_mean": float(nfe.mean()), "iterations": float(res.iterations),
                 "recorded_steps": float(recorded), "prompt_length": float(ro.ids.shape[1]),
                 "advantage_mean": float(np.mean(adv)), "advantage_std": float(np.std(adv)),
                 "advantage_positive_fraction": float(np.mean(adv > 0)), "rollout_s": ro.seconds}
        for name, values in scores.per_function.items():
            stats[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        stats["tpf"] = accounting.tpf(eff, nfe)
        stats["rollout_tokens_per_s"] = float(len(total) * self.cfg.grpo.gen_length / max(ro.seconds, 1e-9))
        lengths, terminated = samples_mod.completion_lengths(scores.generated, self.stop_ids)
        lengths, terminated = gather_rows(lengths), gather_rows(terminated)
        stats.update(samples_mod.rollout_metrics(lengths, terminated, total, scores.per_function,
                                                 self.cfg.grpo.num_generations))
        self._log_samples(ro, scores, adv, nfe, lengths, terminated)
        for key in ("exact_answer", "math_correctness", "apps_execution", "code_tests"):
            if key in scores.per_function:
                stats["accuracy"] = float(np.nanmean(scores.per_function[key] > 0))
        return stats

    # --------------------------------------------------------------------------------------- checkpoints
    def _save(self, force: bool = False) -> None:
        meta = {"step": self.step, "data": self.iterator.get_state(), "config": config_fingerprint(self.cfg)}
        items = {
            "trainable": ocp.args.StandardSave(nnx.to_pure_dict(self.trainable)),
            "opt_state": ocp.args.StandardSave(self.opt_state),
            "meta": ocp.args.JsonSave(meta),
        }
        if self.ref_trainable is not None:
            items["reference"] = ocp.args.StandardSave(nnx.to_pure_dict(self.ref_trainable))
        self.ckpt.save(self.step, args=ocp.args.Composite(**items), force=force)

    def _restore(self) -> bool:
        latest = self.ckpt.latest_step()
        if latest is None:
            return False
        meta = self.ckpt.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        self._check_resumable(meta.get("config"), latest)

        def abstract(tree):
            return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

        items = {"trainable": ocp.args.StandardRestore(abstract(nnx.to_pure_dict(self.trainable))),
                 "opt_state": ocp.args.StandardRestore(abstract(self.opt_state))}
        if self.ref_trainable is not None:
            items["reference"] = ocp.args.StandardRestore(abstract(nnx.to_pure_dict(self.ref_trainable)))
        restored = self.ckpt.restore(latest, args=ocp.args.Composite(**items))
        nnx.replace_by_pure_dict(self.trainable, restored["trainable"])
        if self.ref_trainable is not None:
            nnx.replace_by_pure_dict(self.ref_trainable, restored["reference"])
        self.opt_state = restored["opt_state"]
        self.step = int(meta["step"])
        self.iterator.set_state(meta["data"])
        self.metrics.truncate_after(self.step)
        if self.primary:
            samples_mod.truncate_samples(self.out, self.step)
        return True

    def _check_resumable(self, saved: dict | None, step: int) -> None:
        now = config_fingerprint(self.cfg)
        if saved is None:
            return  # a checkpoint from before fingerprints were recorded
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k, now[k]) != now[k]]
        if changed:
            raise ConfigError(
                f"{self.out / 'checkpoints'} holds a run (step {step}) whose config differs in what the model or "
                f"the data order depend on: {'; '.join(changed)}. Use another output directory, or the original "
                "values to resume")

    # --------------------------------------------------------------------------------------- eval
    @property
    def eval_examples(self) -> list:
        if self._eval_examples is None:
            self._eval_examples = load_examples(self.cfg, "eval")
        return self._eval_examples

    def evaluate(self) -> dict[str, float]:
        """Accuracy, NFE and TPF of the current model on the held-out problems, computed by the evaluation
        harness: the same prompts, tokenisation, batching (``eval.batch_size``), padding and scoring as
        ``dultra eval`` on the exported model, so the two report the same numbers (seed 0, greedy tokens)."""
        from dultra_jax.eval import harness

        if jax.process_count() > 1:
            raise ConfigError("training-time evaluation runs in one process: set train.eval_every=0 and run "
                              "`dultra eval` (several processes split the problems) on the exported model")
        e = self.cfg.eval
        settings = harness.EvalSettings(decode=e.decode, batch_size=e.batch_size)
        # correct = the task's own scorer (dultra_jax.tasks), as `dultra eval` and `dultra score` count it
        summary = harness.evaluate(
            self._current_model(), self.tokenizer, self.eval_examples[: e.num_examples], settings,
            task=self.cfg.task.name, progress=False, warmup=False, plan=self.plan)
        return {"eval_accuracy": summary["accuracy"], "eval_nfe": summary["mean_nfe"], "eval_tpf": summary["tpf"]}

    # --------------------------------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> int | None:
        """The signal that stops the run, agreed by all processes (one that got it stops them all)."""
        sig = self._stop_signal or 0
        if self.num_processes > 1:
            sig = int(gather_rows(np.asarray([sig], np.int32)).max())
        return sig or None

    def run(self) -> dict[str, Any]:
        resumed = self._restore()
        if resumed and self.primary:
            print(f"resumed from step {self.step} in {self.out / 'checkpoints'}")
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        bad = 0
        rng = jax.random.key(cfg.train.seed)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"{cfg.train.mode}", disable=not self.progress)
        last: dict[str, Any] = {}
        every = max(1, cfg.train.save_every)
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            key = jax.random.fold_in(rng, self.step)
            batch, stats = self.mode.make_batch(self, key)
            first = self.step
            for it in range(self._iterations_per_batch):  # mu optimiser updates per rollout, each a step
                if self.step >= cfg.train.max_steps:
                    break
                t_update = time.perf_counter()
                self.trainable, self.opt_state, m = self.step_fn(self.trainable, self.frozen, self.opt_state,
                                                                 self._iteration_batch(batch, it),
                                                                 jax.random.fold_in(key, it))
                m = {k: float(v) for k, v in m.items()}
                if "rollout_tokens_per_s" in stats:  # the update's replay of the rollout's completion tokens
                    rows = cfg.train.batch_size * cfg.grpo.num_generations
                    m["replay_tokens_per_s"] = rows * cfg.grpo.gen_length / max(
                        time.perf_counter() - t_update, 1e-9)
                self.step += 1
                row = {"step": self.step, **m, **stats, "lr": float(self.schedule(self.step - 1)),
                       "step_time_s": time.perf_counter() - t0}
                if self._iterations_per_batch > 1:
                    row["iteration"] = it
                t0 = time.perf_counter()
                bad = bad + 1 if m["skipped"] else 0
                if bad >= cfg.train.max_bad_steps:
                    self.metrics.write(row)
                    raise TrainingAborted(f"{bad} non-finite steps in a row at step {self.step}; last metrics: {row}")
                if self._uses_reference and cfg.grpo.ref_sync_every and self.step % cfg.grpo.ref_sync_every == 0:
                    self.ref_trainable = jax.tree.map(jnp.copy, self.trainable)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    row.update(self.evaluate())
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self.metrics.write(row)
                last = row
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward_mean", "nfe_mean") if k in row})
            # checkpoints land on rollout boundaries: the first one at or after each multiple of save_every
            if self.step // every > first // every:
                self._save(force=True)
            sig = self._stop_requested()
            if sig is not None:
                if self.ckpt.latest_step() != self.step:
                    self._save(force=True)
                self.ckpt.wait_until_finished()
                bar.close()
                raise TrainingInterrupted(sig, self.step)
        bar.close()
        if self.ckpt.latest_step() != self.step:
            self._save(force=True)
        self.ckpt.wait_until_finished()
        self.metrics.close()
        return last

    def export(self, directory: str | Path | None = None) -> Path:
        """Write the trained model as a converted checkpoint (+ tokenizer) for decoding and evaluation; on
        several processes every one takes part (each writes its shards) and process 0 writes the rest."""
        from dultra_jax.checkpoints import save_converted

        target = Path(directory) if directory else self.out / "model"
        t = self.cfg.task
        task = {"name": t.name, "prompt_mode": t.prompt_mode, "max_prompt_length": t.max_prompt_length}
        if get_task(t.name).kind == "synthetic":  # its operand range decides what the model can answer
            task["max_operand"] = t.max_operand
        save_converted(self._current_model(), target, overwrite=True, task=task)
        if self.primary:
            self.tokenizer.save_pretrained(str(target))
        return target


def rollout_copy(model: DUltra, plan=None, dtype=jnp.bfloat16) -> DUltra:
    """A copy of ``model`` with floating parameters in ``dtype``, placed by ``plan`` (e.g. the trainer's plan
    with parameters replicated over fsdp: ``plan.params_replicated_over("fsdp")``), for decoding rollouts."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    if plan is not None:
        state = plan.shard_state(state)
    return nnx.merge(graphdef, state)


def _agree_width(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad this process's prompt rows to the widest of all processes (one global [B, P] batch)."""
    width = int(gather_rows(np.asarray([ids.shape[1]])).max())
    if width == ids.shape[1]:
        return ids, mask
    extra = width - ids.shape[1]
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (extra, 0))))


def _sft_loss(cfg: RunConfig) -> LossFn:
    smoothing, seed = cfg.sequence.label_smoothing, cfg.train.seed

    def loss(gd, states, batch, rng):  # per-row noise from (train.seed, row_seed), not the micro-batch key
        return sft_loss(gd, states, batch, jax.random.key(seed), label_smoothing=smoothing)
    return loss


def _planner_loss(cfg: RunConfig) -> LossFn:
    factor = cfg.sequence.factor

    def loss(gd, states, batch, rng):
        return planner_loss(gd, states, batch, rng, factor=factor)
    return loss


def _grpo_loss(cfg: RunConfig) -> LossFn:
    return objectives.objective(cfg.grpo.loss).loss(cfg.grpo, cfg.train.trainable)  # cfg.grpo: a GRPOLossConfig


MODES: dict[str, Mode] = {
    "sft": Mode(Trainer._build_sequence_data, Trainer._sft_batch, _sft_loss),
    "planner": Mode(Trainer._build_sequence_data, Trainer._planner_batch, _planner_loss),
    "grpo": Mode(Trainer._build_prompt_data, Trainer._grpo_batch, _grpo_loss),
}
