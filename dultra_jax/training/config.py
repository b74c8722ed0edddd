"""Typed run configuration for ``dultra sft | pretrain-planner | train``, read from YAML with dotted overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dultra_jax.config import ConfigError
from dultra_jax.decoding.loop import DecodeConfig
from dultra_jax.training.grpo import GRPOLossConfig
from dultra_jax.training.step import OptimConfig


@dataclass
class ModelSection:
    path: str | None = None  # HF or converted checkpoint; None -> a fresh model of `preset`
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields over the preset
    dtype: str = "fp32"  # compute dtype
    param_dtype: str | None = None  # master weights (default: dtype)
    remat: str = "none"
    seed: int = 0


@dataclass
class TaskSection:
    name: str = "synthetic-addition"  # or gsm8k | math500 | apps | humaneval | mbpp
    data_file: str | None = None
    split: str | None = None
    limit: int | None = None
    prompt_mode: str = "thinking"
    tokenizer: str | None = None  # default: the model directory's tokenizer
    num_train: int = 512  # synthetic task sizes
    num_eval: int = 64
    max_operand: int = 20
    max_prompt_length: int = 512
    pad_to_multiple: int = 64  # GRPO prompts are left-padded to a multiple of this: one compile per padded length

    def __post_init__(self) -> None:
        from dultra_jax.data.prompts import PROMPT_MODES
        from dultra_jax.tasks import task_names

        known = task_names("train")
        _require(self.name in known, f"task.name: unknown task {self.name!r}; choose one of {known}")
        _require(self.prompt_mode.lower() in PROMPT_MODES, f"task.prompt_mode must be one of {list(PROMPT_MODES)}, got "
                 f"{self.prompt_mode!r}")
        for name in ("num_train", "num_eval", "max_operand", "max_prompt_length", "pad_to_multiple"):
            _positive(self, name)
        _require(self.limit is None or self.limit >= 1, f"task.limit must be >= 1 (or null), got {self.limit}")


@dataclass
class TrainSection:
    mode: str = "grpo"  # sft | planner | grpo
    max_steps: int = 100
    batch_size: int = 8  # sequences per step (sft/planner); prompts per step for grpo
    micro_batches: int = 1
    trainable: str = "all"  # all | planner | backbone (planner mode always trains the planner only)
    seed: int = 42
    save_every: int = 50
    keep: int = 3
    async_checkpointing: bool = True
    log_every: int = 1
    eval_every: int = 0
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    mesh: str | None = None  # e.g. "data=1,fsdp=8,tensor=1" (-1 = the rest); None = one device
    # GRPO rollouts: decode with the training weights as sharded (sharded), or with a bf16 copy replicated over
    # fsdp (replicated_bf16: no all-gather per decoding iteration; refreshed after every update)
    rollout_weights: str = "sharded"

    def __post_init__(self) -> None:
        _require(self.mode in ("sft", "planner", "grpo"), f"train.mode must be sft, planner or grpo, got {self.mode!r}")
        for name in ("batch_size", "micro_batches", "save_every", "keep", "log_every", "max_bad_steps"):
            _positive(self, name)
        _require(self.max_steps >= 0 and self.eval_every >= 0,
                 f"train.max_steps ({self.max_steps}) and train.eval_every ({self.eval_every}) must be >= 0")
        _require(self.batch_size % self.micro_batches == 0, f"train.batch_size ({self.batch_size}) must be a "
                 f"multiple of train.micro_batches ({self.micro_batches})")
        _require(self.trainable in ("all", "planner", "backbone"),
                 f"train.trainable must be all, planner or backbone, got {self.trainable!r}")
        _require(self.rollout_weights in ("sharded", "replicated_bf16"),
                 f"train.rollout_weights must be sharded or replicated_bf16, got {self.rollout_weights!r}")
        if self.mesh is not None:
            from dultra_jax.parallel import MeshConfig

            try:
                MeshConfig.parse(self.mesh)
            except ValueError as e:
                raise ValueError(f"train.mesh: {e}") from e


@dataclass
class DataSection:
    """Where SFT / planner sequences come from (docs/training-data.md): the task's worked solutions ("task"), or
    a streamed conversation source (dultra_jax.data.sources): nemotron | s1k | chat."""

    source: str = "task"
    path: str | None = None  # hub dataset id [@revision], local directory or file; default: the source's own
    splits: list[str] | None = None  # default: the source's (nemotron: math, code)
    max_length: int = 512  # prompt + answer + <|eot_id|>, right-padded / truncated (the original's 512)


@dataclass
class SequenceSection:
    """Answer region length for SFT / planner pre-training sequences (answer + end-of-turn + padding)."""

    gen_length: int = 16
    min_block: int = 32  # planner collator's minimum block
    factor: float = 1.0  # planner targets: Fast-dLLM factor
    label_smoothing: float = 0.0  # SFT

    def __post_init__(self) -> None:
        _positive(self, "gen_length")
        _positive(self, "min_block")
        _require(self.factor > 0, f"sequence.factor must be > 0, got {self.factor}")
        _require(0 <= self.label_smoothing < 1,
                 f"sequence.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class RolloutSection:
    """How GRPO rollouts decode: any reveal rule of :class:`dultra_jax.decoding.DecodeConfig` (the replay loss
    needs ``planner``; ``diffu_grpo`` takes any, so plain LLaDA can roll out with ``threshold``/``factor``/
    ``fixed``). The factor rule's factor is ``grpo.factor`` (the planner's too: one value for rollout and loss)."""

    strategy: str = "planner"  # planner | threshold | factor | fixed
    reveal: str = "bernoulli"  # planner decision: bernoulli (the original's "training") | topk ("inference")
    threshold: float = 0.9  # threshold rule
    steps: int | None = None  # fixed rule: total steps (default gen_length)


@dataclass(frozen=True)
class GRPOSection(GRPOLossConfig):
    """The loss options are :class:`GRPOLossConfig`'s own fields (one definition; ``cfg.grpo`` is the loss
    config); the rest configure rollouts, rewards and the reference model."""

    max_completion_length: int | None = None  # the loss's length normaliser; default: gen_length
    num_generations: int = 12
    gen_length: int = 256
    temperature: float = 0.1
    scale_rewards: str = "none"
    # beta > 0: the reference is re-synced every ref_sync_every optimiser updates; 0 = the policy at step 0
    # (TRL's default), kept for the whole run and checkpointed with it
    ref_sync_every: int = 0
    num_iterations: int = 1  # optimiser updates per rollout (TRL's mu); steps count updates
    reward_config: str | None = None  # rewards YAML (default configs/rewards.yaml)
    reward_weights: dict[str, float] = field(default_factory=dict)  # override / add weights by reward name
    step_penalty_scale: float = 50.0  # the original's -(steps)/50
    loss: str = "replay"  # an objective of dultra_jax.training.objectives: replay | diffu_grpo
    p_mask_prompt: float = 0.15  # diffu_grpo: probability a prompt token is MASKed in the one-step estimate
    rollout: RolloutSection = field(default_factory=RolloutSection)

    def __post_init__(self) -> None:
        from dultra_jax.training.objectives import OBJECTIVES

        if self.max_completion_length is None:
            object.__setattr__(self, "max_completion_length", self.gen_length)
        for name in ("num_iterations", "gen_length", "block_length", "max_completion_length"):
            _positive(self, name)
        _require(self.num_generations >= 2, f"grpo.num_generations must be >= 2 (advantages compare a prompt's "
                 f"generations with each other), got {self.num_generations}")
        _require(self.gen_length % self.block_length == 0, f"grpo.gen_length ({self.gen_length}) must be a multiple "
                 f"of grpo.block_length ({self.block_length})")
        _require(self.temperature >= 0, f"grpo.temperature must be >= 0, got {self.temperature}")
        _require(self.planner_temperature is None or self.planner_temperature > 0,
                 f"grpo.planner_temperature must be > 0 (or null), got {self.planner_temperature}")
        _require(self.scale_rewards in ("none", "group", "batch"),
                 f"grpo.scale_rewards must be none, group or batch, got {self.scale_rewards!r}")
        _require(self.ref_sync_every >= 0 and self.beta >= 0,
                 f"grpo.ref_sync_every ({self.ref_sync_every}) and grpo.beta ({self.beta}) must be >= 0")
        _require(self.loss in OBJECTIVES,
                 f"grpo.loss: unknown grpo.loss {self.loss!r}; choose one of {sorted(OBJECTIVES)}")
        _require(not (OBJECTIVES[self.loss].replays_trajectory and self.rollout.strategy != "planner"),
                 f"grpo.loss={self.loss} replays the planner's decisions: it needs grpo.rollout.strategy=planner "
                 f"(got {self.rollout.strategy!r}); or use grpo.loss=diffu_grpo")
        _require(0.0 <= self.p_mask_prompt <= 1.0, f"grpo.p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}")
        from dultra_jax.decoding import DecodeConfig

        try:
            DecodeConfig(gen_length=self.gen_length, block_length=self.block_length, strategy=self.rollout.strategy,
                         reveal=self.rollout.reveal, threshold=self.rollout.threshold, steps=self.rollout.steps,
                         factor=self.factor, temperature=self.temperature)
        except ValueError as e:
            raise ValueError(f"grpo.rollout: {e}") from e


def _eval_decode() -> DecodeConfig:
    return DecodeConfig(gen_length=16, block_length=8)


@dataclass
class EvalSection:
    """Training-time evaluation: how many held-out problems, in batches of how many, decoded how (the one
    :class:`~dultra_jax.decoding.DecodeConfig`; YAML ``eval.decode.gen_length`` etc., unset fields keep these
    defaults)."""

    num_examples: int = 64
    batch_size: int = 32
    decode: DecodeConfig = field(default_factory=_eval_decode)

    def __post_init__(self) -> None:
        from dultra_jax.decoding import DecodeConfig

        _positive(self, "num_examples")
        _positive(self, "batch_size")
        if not isinstance(self.decode, DecodeConfig):
            raise ValueError(f"eval.decode must be a mapping of decoding settings, got {self.decode!r}")


@dataclass
class LoggingSection:
    """Metric sinks beside metrics.jsonl and TensorBoard (dultra_jax.wandb_sink)."""

    wandb: bool = False  # mirror the metrics into a wandb run (WANDB_MODE / WANDB_PROJECT / WANDB_DIR honoured)
    wandb_project: str | None = None  # default: WANDB_PROJECT, else "dultra-jax"
    wandb_name: str | None = None  # default: the output directory's name
    samples_every: int = 10  # GRPO: every N steps a few completions go to samples.jsonl / TensorBoard / wandb
    samples_per_step: int = 4  # how many (the first rows of the batch); 0 or samples_every 0: none


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sequence: SequenceSection = field(default_factory=SequenceSection)
    data: DataSection = field(default_factory=DataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    _require(value >= 1, f"{_SECTION_OF[type(obj).__name__]}.{name} must be >= 1, got {value}")


# section name by dataclass (messages name the dotted key a user writes)
_SECTION_OF = {"TaskSection": "task", "TrainSection": "train", "SequenceSection": "sequence",
               "GRPOSection": "grpo", "EvalSection": "eval", "DataSection": "data", "LoggingSection": "logging"}


def _build(cls, data: dict[str, Any], where: str, base=None):
    """``cls`` from a YAML mapping; with ``base`` (a section whose fields have no defaults of their own, e.g. a
    DecodeConfig) the mapping replaces the fields of ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section '{where}'; known: {sorted(names)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        sub = _SECTIONS.get((cls, k))
        here = f"{where}.{k}" if where else k
        merge = _MERGED.get((cls, k))
        kwargs[k] = (_build(sub, v, here, base=merge() if merge else None) if sub is not None
                     else _coerce(v, hints[k], here))
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        if where and str(e).startswith((f"{where}.", f"{where}:")):  # the message names the key already
            raise ConfigError(f"bad config value: {e}") from e
        raise ConfigError(f"bad value in config section '{where or 'root'}': {e}") from e


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """YAML gives strings for some numbers ("1e-3"); convert scalars to the field's declared type."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else ()
    if value is None:
        if args and type(None) in args:
            return None
        raise ConfigError(f"config key '{where}' cannot be null")
    target = next((a for a in args if a is not type(None)), tp) if args else tp
    try:
        if target is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if target is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            return int(value)
        if target is bool and isinstance(value, str):
            return {"true": True, "false": False}[value.lower()]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config key '{where}': cannot read {value!r} as {target.__name__}") from e
    return value


_SECTIONS = {
    (RunConfig, "model"): ModelSection, (RunConfig, "task"): TaskSection, (RunConfig, "train"): TrainSection,
    (RunConfig, "optim"): OptimConfig, (RunConfig, "sequence"): SequenceSection, (RunConfig, "grpo"): GRPOSection,
    (RunConfig, "eval"): EvalSection, (RunConfig, "logging"): LoggingSection, (RunConfig, "data"): DataSection,
    (GRPOSection, "rollout"): RolloutSection, (EvalSection, "decode"): DecodeConfig,
}
# Nested sections read over their defaults (their dataclass has required fields)
_MERGED = {(EvalSection, "decode"): _eval_decode}


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{p}' is not a section")
    node[parts[-1]] = value


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    for item in overrides or []:
        apply_override(data, item)
    cfg = _build(RunConfig, data, "")
    if cfg.data.source != "task":
        from dultra_jax.data.sources import SOURCES

        if cfg.data.source not in SOURCES:
            raise ConfigError(f"data.source must be task or one of {sorted(SOURCES)}, got {cfg.data.source!r}")
        if cfg.train.mode == "grpo":
            raise ConfigError(f"data.source={cfg.data.source} feeds SFT and planner sequences; GRPO reads task "
                              "prompts: set data.source=task")
    if cfg.logging.samples_every < 0 or cfg.logging.samples_per_step < 0:
        raise ConfigError("logging.samples_every and logging.samples_per_step must be >= 0")
    return cfg
