"""The resumable training loop for SFT, planner pre-training and GRPO.

One loop for all three modes: data (grain, checkpointed iterator) -> batch -> one jitted pure step ->
metrics (JSONL, TensorBoard when tensorboardX is installed) -> orbax checkpoint (every N steps, keep K, async,
atomic) -> periodic eval. Re-running in an output directory that holds checkpoints resumes from the latest
one with the same data order, rng and step. Non-finite steps are skipped (params untouched) and the run aborts
after ``train.max_bad_steps`` of them in a row.
"""

from __future__ import annotations

import json
import logging
import os
import time
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
from dultra_jax.config import ConfigError, preset
from dultra_jax.data import synthetic
from dultra_jax.decoding import generate
from dultra_jax.model.dultra import DUltra
from dultra_jax.training import grpo as grpo_mod
from dultra_jax.training.config import RunConfig
from dultra_jax.training.planner_pretrain import noise_batch, planner_loss
from dultra_jax.training.sft import sft_loss
from dultra_jax.training.step import (
    init_optimizer,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    split_trainable,
)

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row."""


# ------------------------------------------------------------------------------------------- pieces
def build_model(cfg: RunConfig) -> DUltra:
    m = cfg.model
    dtype, param_dtype = parse_dtype(m.dtype), parse_dtype(m.param_dtype)
    if m.path:
        import dultra_jax

        return dultra_jax.load(m.path, dtype=dtype, param_dtype=param_dtype, remat=m.remat, seed=m.seed)
    overrides = dict(m.overrides)
    if cfg.task.name == synthetic.TASK_NAME:
        overrides = {**synthetic.MODEL_OVERRIDES, **overrides}
    return DUltra(preset(m.preset, **overrides), dtype=dtype, param_dtype=param_dtype, remat=m.remat,
                  rngs=nnx.Rngs(m.seed))


def build_tokenizer(cfg: RunConfig):
    if cfg.task.name == synthetic.TASK_NAME and cfg.task.tokenizer is None:
        return synthetic.build_tokenizer()
    src = cfg.task.tokenizer or (str(resolve_model_path(cfg.model.path)) if cfg.model.path else None)
    if src is None:
        raise ConfigError("task.tokenizer (or model.path with tokenizer files) is needed for task " + cfg.task.name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def load_examples(cfg: RunConfig, split: str) -> list:
    t = cfg.task
    if t.name == synthetic.TASK_NAME:
        n = t.num_train if split == "train" else t.num_eval
        return synthetic.addition_examples(n, seed=0 if split == "train" else 1, max_operand=t.max_operand)
    from dultra_jax.data import load_task

    style = "train" if split == "train" else "eval"
    return load_task(t.name, split=t.split, data_file=t.data_file, style=style, prompt_mode=t.prompt_mode,
                     limit=t.limit)


def answer_of(example) -> str:
    """Target text for SFT / planner sequences: the synthetic answer, or the task's worked reference solution
    (MATH ``solution``, HumanEval ``canonical_solution``, MBPP ``code``, GSM8K's full ``answer``)."""
    if example.task == synthetic.TASK_NAME:
        return synthetic.answer_text(example)
    meta = example.metadata or {}
    for key in ("solution", "canonical_solution", "code", "answer"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    return str(example.answer or "")


def encode_sequences(examples, tokenizer, gen_length: int, eos_id: int) -> tuple[np.ndarray, int]:
    """[N, P + G] = left-padded chat prompt | answer + <|eot_id|> + end-of-text padding; returns (ids, P)."""
    from dultra_jax.data.prompts import render_chat

    prompts = [tokenizer(render_chat(tokenizer, list(e.messages)), add_special_tokens=False)["input_ids"]
               for e in examples]
    eot = "<|eot_id|>" if "<|eot_id|>" in tokenizer.get_vocab() else ""
    answers = [tokenizer(answer_of(e) + eot, add_special_tokens=False)["input_ids"][:gen_length] for e in examples]
    p = max(len(x) for x in prompts)
    ids = np.full((len(examples), p + gen_length), eos_id, np.int32)
    for i, (pr, an) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, p - len(pr):p] = pr
        ids[i, p:p + len(an)] = an
    return ids, p


def _split_micro(tree, n: int, axis: int = 0, plan=None):
    """Stack ``n`` micro-batches on a new leading axis by splitting ``axis`` (the batch axis) of every leaf;
    with a sharding plan, each leaf is placed with its batch axis split over the mesh."""
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
    """JSONL (always) + TensorBoard (when tensorboardX is importable) + wandb (a ``WandbSink``, when given)."""

    def __init__(self, directory: Path, *, wandb=None):
        self.path = directory / "metrics.jsonl"
        self._wandb = wandb
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self._tb = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict[str, Any]) -> None:
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

    def close(self) -> None:
        """Finish the wandb run (JSONL and TensorBoard need nothing)."""
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (from a run killed after its last checkpoint) so a resumed log is clean."""
        if not self.path.is_file():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
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
class Trainer:
    def __init__(self, cfg: RunConfig, output_dir: str | Path, *, progress: bool = True):
        self.cfg = cfg
        self.out = Path(output_dir).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.tokenizer = build_tokenizer(cfg)
        self.plan = None
        if cfg.train.mesh:
            from dultra_jax.parallel import ShardingPlan, initialize_distributed

            initialize_distributed()
            self.plan = ShardingPlan.create(cfg.train.mesh)
        self.model = build_model(cfg)
        if self.plan is not None:
            self.model = self.plan.shard_model(self.model)
        mode = cfg.train.mode
        which = "planner" if mode == "planner" else cfg.train.trainable
        self.graphdef, self.trainable, self.frozen = split_trainable(self.model, which)
        self.tx = make_optimizer(cfg.optim)
        self.schedule = learning_rate_schedule(cfg.optim)
        self.opt_state = init_optimizer(self.tx, self.trainable, self.plan)
        self.mcfg = self.model.cfg
        # ids that are not effective tokens for TPF (end-of-text, pad, MASK, <|eot_id|>), as the evaluation counts
        self.exclude_ids = accounting.model_excluded_ids(self.mcfg, self.tokenizer)
        self.examples = load_examples(cfg, "train")
        self._eval_examples = None
        self.loss_cfg = grpo_mod.GRPOLossConfig(
            epsilon_low=cfg.grpo.epsilon_low, epsilon_high=cfg.grpo.epsilon_high, delta=cfg.grpo.delta,
            advantage_min_clip=cfg.grpo.advantage_min_clip, beta=cfg.grpo.beta, block_length=cfg.grpo.block_length,
            max_completion_length=cfg.grpo.gen_length,
        )
        self._build_data()
        self._build_step()
        self.ckpt = ocp.CheckpointManager(
            self.out / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep, save_interval_steps=cfg.train.save_every,
                                                 enable_async_checkpointing=cfg.train.async_checkpointing),
        )
        self.metrics = MetricsWriter(self.out, wandb=_wandb_sink(cfg, self.out))
        self.step = 0
        self.ref_states = None
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

    # --------------------------------------------------------------------------------------- data
    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.train.mode == "grpo":
            from dultra_jax.data import PromptPipeline

            self.pipeline = PromptPipeline(
                self.examples, self.tokenizer, prompts_per_batch=cfg.train.batch_size,
                num_generations=cfg.grpo.num_generations, seed=cfg.train.seed,
                max_prompt_length=cfg.task.max_prompt_length, pad_id=self.mcfg.pad_token_id,
            )
            self.iterator = iter(self.pipeline.dataset())
            self._build_rewards()
            return
        import grain

        ids, self.prompt_len = encode_sequences(self.examples, self.tokenizer, cfg.sequence.gen_length,
                                                self.mcfg.eos_token_id)
        self.sequences = ids
        ds = grain.MapDataset.range(len(ids)).seed(cfg.train.seed).shuffle().repeat(None)
        ds = ds.batch(cfg.train.batch_size, drop_remainder=True)
        self.iterator = iter(ds.to_iter_dataset())

    def _build_rewards(self) -> None:
        from dultra_jax.rewards import registry

        g = self.cfg.grpo
        ctx = registry.RewardContext()
        if self.cfg.task.name == synthetic.TASK_NAME:
            weights = {"exact_answer": 1.0, "step_penalty": 0.1, **g.reward_weights}
        else:
            rs = registry.build_rewards(self.cfg.task.name, g.reward_config)
            weights = {**rs.weights, **g.reward_weights}
            ctx = rs.context
        terms = []
        for name, w in weights.items():
            if name == "exact_answer":
                terms.append((name, w, lambda inp: synthetic.exact_answer(inp.completions, inp.examples)))
            else:
                opts = ctx.opt(name)
                if name == "step_penalty":
                    opts["scale"] = g.step_penalty_scale
                terms.append((name, w, registry.REWARDS[name](ctx, opts)))
        self.rewards = registry.RewardSet(dataset=self.cfg.task.name, terms=terms, context=ctx)

    def _next_batch(self):
        return next(self.iterator)

    # --------------------------------------------------------------------------------------- steps
    def _build_step(self) -> None:
        mode = self.cfg.train.mode
        if mode == "sft":
            smoothing = self.cfg.sequence.label_smoothing

            def loss(gd, states, batch, rng):
                return sft_loss(gd, states, batch, rng, label_smoothing=smoothing)
        elif mode == "planner":
            factor = self.cfg.sequence.factor

            def loss(gd, states, batch, rng):
                return planner_loss(gd, states, batch, rng, factor=factor)
        else:
            loss_cfg = self.loss_cfg

            def loss(gd, states, batch, rng):
                return grpo_mod.grpo_loss(gd, states, batch, loss_cfg)
        self.step_fn = make_train_step(self.graphdef, loss, self.tx, plan=self.plan, trainable=self.trainable,
                                       frozen=self.frozen, opt_state=self.opt_state)

    def _current_model(self) -> DUltra:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def _train_batch(self, rng: jax.Array) -> tuple[Any, dict[str, float]]:
        cfg, mode = self.cfg, self.cfg.train.mode
        n = cfg.train.micro_batches
        if mode in ("sft", "planner"):
            idx = np.asarray(self._next_batch())
            ids = self.sequences[idx]
            if mode == "sft":
                answer = np.zeros_like(ids)
                answer[:, self.prompt_len:] = 1
                return _split_micro({"input_ids": ids, "answer_mask": answer}, n, plan=self.plan), {}
            host_rng = np.random.default_rng([cfg.train.seed, self.step])
            noisy, block = noise_batch(ids, np.full(len(ids), self.prompt_len), self.mcfg.mask_token_id, host_rng,
                                       min_block=cfg.sequence.min_block)
            return _split_micro({"input_ids": noisy, "block_index": block}, n, plan=self.plan), {}
        return self._grpo_batch(rng)

    def _grpo_batch(self, rng: jax.Array):
        from dultra_jax.rewards.registry import RewardInputs
        from dultra_jax.rewards.speed import trajectory_from_reveals

        g, n = self.cfg.grpo, self.cfg.train.micro_batches
        batch = self._next_batch()
        examples = self.pipeline.examples_for(batch)
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        t0 = time.perf_counter()
        res = generate(self._current_model(), ids, attention_mask=mask, gen_length=g.gen_length,
                       block_length=g.block_length, temperature=g.temperature, rng=rng, return_trajectory=True,
                       row_seeds=np.arange(len(ids)) + self.step * len(ids), plan=self.plan)
        jax.block_until_ready(res.tokens)
        rollout_s = time.perf_counter() - t0
        traj = res.trajectory
        reveal = np.asarray(traj.reveal)
        s = int(traj.num_steps)
        positions = [trajectory_from_reveals(reveal[:s, b]) for b in range(len(ids))]
        gen = np.asarray(res.generated)
        texts = self.tokenizer.batch_decode([row[row < len(self.tokenizer)] for row in gen],
                                            skip_special_tokens=True)
        out = self.rewards(RewardInputs(texts, examples, trajectories=positions))
        adv = grpo_mod.group_advantages(jnp.asarray(out.total), g.num_generations, g.scale_rewards)
        canvas_mask = np.concatenate([mask, np.ones((len(ids), g.gen_length), np.int32)], axis=1)
        ref = None
        if g.beta > 0:
            from dultra_jax.decoding import trajectory_logps

            ref_model = nnx.merge(self.graphdef, *(self.ref_states or (self.trainable, self.frozen)))
            ref = trajectory_logps(ref_model, jnp.asarray(ids), traj.reveal, traj.proposals,
                                   block_length=g.block_length, attention_mask=jnp.asarray(canvas_mask))
        rollout = grpo_mod.Rollout(prompt_ids=jnp.asarray(ids), reveal=traj.reveal, proposals=traj.proposals,
                                   old_logps=traj.logps, advantages=adv, attention_mask=jnp.asarray(canvas_mask),
                                   ref_logps=ref)
        def split(a, axis=0):
            return _split_micro(a, n, axis, plan=self.plan)

        micro = grpo_mod.Rollout(
            prompt_ids=split(rollout.prompt_ids), reveal=split(rollout.reveal, 1),
            proposals=split(rollout.proposals, 1), old_logps=split(rollout.old_logps, 1),
            advantages=split(rollout.advantages), attention_mask=split(rollout.attention_mask),
            ref_logps=None if ref is None else split(ref, 1),
        )
        counted = accounting.account(gen, res.nfe, self.exclude_ids, self.mcfg.mask_token_id)
        stats = {"reward_mean": float(out.total.mean()), "reward_std": float(out.total.std()),
                 "nfe_mean": counted.mean_nfe, "iterations": float(res.iterations),
                 "advantage_mean": float(jnp.mean(adv)), "advantage_std": float(jnp.std(adv)),
                 "advantage_positive_fraction": float(jnp.mean(adv > 0)), "rollout_s": rollout_s}
        for name, values in out.per_function.items():
            stats[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        stats["tpf"] = counted.tpf
        stats["generated_tokens_per_s"] = float(gen.size / max(rollout_s, 1e-9))
        for key in ("exact_answer", "math_correctness", "apps_execution", "code_tests"):
            if key in out.per_function:
                stats["accuracy"] = float(np.nanmean(out.per_function[key] > 0))
        return micro, stats

    # --------------------------------------------------------------------------------------- checkpoints
    def _save(self, force: bool = False) -> None:
        meta = {"step": self.step, "data": self.iterator.get_state()}
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(nnx.to_pure_dict(self.trainable)),
            opt_state=ocp.args.StandardSave(self.opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.ckpt.save(self.step, args=args, force=force)

    def _restore(self) -> bool:
        latest = self.ckpt.latest_step()
        if latest is None:
            return False
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(self.trainable))
        restored = self.ckpt.restore(latest, args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(abstract),
            opt_state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, self.opt_state)),
            meta=ocp.args.JsonRestore(),
        ))
        nnx.replace_by_pure_dict(self.trainable, restored["trainable"])
        self.opt_state = restored["opt_state"]
        self.step = int(restored["meta"]["step"])
        self.iterator.set_state(restored["meta"]["data"])
        self.metrics.truncate_after(self.step)
        return True

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
        settings = harness.EvalSettings(strategy=e.strategy, gen_length=e.gen_length, block_length=e.block_length,
                                        batch_size=e.batch_size)
        task = self.cfg.task.name
        summary = harness.evaluate(
            self._current_model(), self.tokenizer, self.eval_examples[: e.num_examples], settings, task=task,
            progress=False, warmup=False, plan=self.plan,
            scorer=None if task in harness.EVAL_TASKS else self._reward_scorer)
        return {"eval_accuracy": summary["accuracy"], "eval_nfe": summary["mean_nfe"], "eval_tpf": summary["tpf"]}

    def _reward_scorer(self, examples, completions) -> list[dict[str, Any]]:
        """Tasks without an evaluation scorer (training-only sets): correct = the correctness reward is > 0."""
        from dultra_jax.rewards.registry import RewardInputs

        terms = self.rewards.terms if hasattr(self, "rewards") else []
        fn = [t for t in terms if t[0] in ("math_correctness", "code_tests", "apps_execution")]
        if not fn:
            raise ConfigError(f"task {self.cfg.task.name!r} has no correctness reward to evaluate with")
        values = fn[0][2](RewardInputs(list(completions), list(examples)))
        return [{"correct": bool((v or 0) > 0), "status": "reward"} for v in values]

    # --------------------------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self._restore()
        if resumed:
            print(f"resumed from step {self.step} in {self.out / 'checkpoints'}")
        bad = 0
        rng = jax.random.key(cfg.train.seed)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"{cfg.train.mode}", disable=not self.progress)
        last: dict[str, Any] = {}
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            key = jax.random.fold_in(rng, self.step)
            batch, stats = self._train_batch(key)
            for _ in range(max(1, cfg.grpo.num_iterations if cfg.train.mode == "grpo" else 1)):
                self.trainable, self.opt_state, m = self.step_fn(self.trainable, self.frozen, self.opt_state, batch,
                                                                 key)
            m = {k: float(v) for k, v in m.items()}
            self.step += 1
            row = {"step": self.step, **m, **stats, "lr": float(self.schedule(self.step - 1)),
                   "step_time_s": time.perf_counter() - t0}
            bad = bad + 1 if m["skipped"] else 0
            if bad >= cfg.train.max_bad_steps:
                self.metrics.write(row)
                raise TrainingAborted(f"{bad} non-finite steps in a row at step {self.step}; last metrics: {row}")
            if cfg.grpo.ref_sync_every and self.step % cfg.grpo.ref_sync_every == 0:
                self.ref_states = jax.tree.map(jnp.copy, (self.trainable, self.frozen))
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                row.update(self.evaluate())
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                self.metrics.write(row)
            self._save()
            last = row
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "reward_mean", "nfe_mean") if k in row})
        bar.close()
        if self.ckpt.latest_step() != self.step:
            self._save(force=True)
        self.ckpt.wait_until_finished()
        self.metrics.close()
        return last

    def export(self, directory: str | Path | None = None) -> Path:
        """Write the trained model as a converted checkpoint (+ tokenizer) for decoding and evaluation."""
        from dultra_jax.checkpoints import save_converted

        target = Path(directory) if directory else self.out / "model"
        save_converted(self._current_model(), target, overwrite=True)
        self.tokenizer.save_pretrained(str(target))
        return target
