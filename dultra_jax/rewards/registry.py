"""Reward registry: named reward functions, and per-dataset weighted lists of them read from YAML.

The original's table (docs/original.md §7) is ``configs/rewards.yaml``:
each dataset's own rewards, plus the ``thinking`` rewards when ``prompt_mode`` is thinking, plus the
``always`` rewards (the step penalty's weight becomes 0 with ``freeze_unmasking_head``). The combined reward
is ``nansum_k w_k r_k``; a function that cannot score a completion returns None, which counts as NaN.

Names here -> the original's functions: ``math_correctness`` = correctness_reward_func_math,
``answer_format`` = boxed_and_answer_tags_format_reward, ``think_format`` = soft_format_reward_func,
``code_fence_format`` = codefence_reward_func, ``apps_execution`` = apps_reward_func, ``step_penalty`` =
gen_step_reward, ``teacher_logprob`` = verifier_reward. ``code_tests`` (HumanEval/MBPP tests pass -> 1.0) is ours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax.rewards import format as fmt
from dultra_jax.rewards.speed import STEP_SCALE, step_penalty

# Shipped inside the package (works after a non-editable install); configs/rewards.yaml links to it.
DEFAULT_CONFIG = Path(str(resources.files("dultra_jax.rewards") / "rewards.yaml"))


class RewardConfigError(ValueError):
    """A reward configuration that names unknown rewards/datasets or has malformed weights/options."""


@dataclass
class RewardInputs:
    """What reward functions see: completion texts, their problems, and (speed/distillation) decoding records."""

    completions: Sequence[str]
    examples: Sequence[Any]  # dultra_jax.data.Example
    trajectories: Sequence[Sequence[Sequence[int]]] | None = None  # per completion: revealed positions per step
    student_logprobs: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if len(self.completions) != len(self.examples):
            raise ValueError(f"{len(self.completions)} completions but {len(self.examples)} examples")


RewardFn = Callable[[RewardInputs], list[float | None]]


class RewardContext:
    """Heavy resources shared by reward functions, built on first use: verifier pools, sandbox, teachers."""

    def __init__(self, options: Mapping[str, Any] | None = None, teachers: Mapping[str, str] | None = None):
        self.options = dict(options or {})
        self.teacher_names = dict(teachers or {})
        self._math = None
        self._code = None
        self._teachers: dict[str, Any] = {}
        self.teacher_plan = None  # a ShardingPlan (set by the trainer): teachers are placed on its mesh

    def opt(self, name: str) -> dict[str, Any]:
        return dict(self.options.get(name) or {})

    @property
    def math(self):
        if self._math is None:
            from dultra_jax.rewards.procpool import MathVerifier

            o = self.opt("math_correctness")
            self._math = MathVerifier(workers=o.get("workers"), timeout_s=float(o.get("timeout_s", 10.0)),
                                      mode=o.get("mode", "eval"))
        return self._math

    @property
    def code(self):
        if self._code is None:
            from dultra_jax.rewards.code import CodeVerifier
            from dultra_jax.rewards.sandbox import Sandbox, SandboxLimits

            o = self.opt("code")
            sandbox = Sandbox(
                SandboxLimits(timeout_s=float(o.get("harness_timeout_s", 3.0)), memory_mb=int(o.get("memory_mb", 1024)),
                              output_bytes=int(o.get("output_bytes", 1 << 20))),
                workers=o.get("workers"), namespaces=o.get("namespaces"), audit_hook=bool(o.get("audit_hook", True)),
            )
            self._code = CodeVerifier(sandbox, apps_timeout_s=float(o.get("apps_timeout_s", 10.0)))
        return self._code

    def teacher(self, kind: str):
        if kind not in self._teachers:
            from dultra_jax.rewards.distill import TeacherScorer

            name = self.teacher_names.get(kind)
            if not name:
                raise RewardConfigError(f"no teacher configured for {kind!r} problems (config key teachers.{kind})")
            o = self.opt("teacher_logprob")
            self._teachers[kind] = TeacherScorer.from_pretrained(
                name, dtype=o.get("dtype", "bf16"), bucket=int(o.get("bucket", 64)), chunk=int(o.get("chunk", 128)),
                plan=self.teacher_plan)
        return self._teachers[kind]

    def close(self) -> None:
        if self._math is not None:
            self._math.close()
            self._math = None


# ------------------------------------------------------------------------------------------- reward functions
def _texts(fn: Callable[[str], float]) -> Callable[[RewardContext, dict], RewardFn]:
    return lambda ctx, opts: (lambda inp: [fn(c) for c in inp.completions])


def _math_correctness(ctx: RewardContext, opts: dict) -> RewardFn:
    def run(inp: RewardInputs) -> list[float | None]:
        answers = [e.answer for e in inp.examples]
        if any(a is None for a in answers):
            raise RewardConfigError("math_correctness needs examples with a reference answer (math tasks)")
        return list(ctx.math.rewards(list(inp.completions), answers))

    return run


def _apps_execution(ctx: RewardContext, opts: dict) -> RewardFn:
    def run(inp: RewardInputs) -> list[float | None]:
        problems = [dict(e.tests or {}) for e in inp.examples]
        if any(p.get("kind") != "apps" for p in problems):
            raise RewardConfigError("apps_execution needs APPS examples (tests.kind == 'apps')")
        return [r.reward for r in ctx.code.score_apps(problems, list(inp.completions))]

    return run


def _code_tests(ctx: RewardContext, opts: dict) -> RewardFn:
    """1.0 when the program passes its problem's tests in the sandbox (pass@1), else 0.0: the verdict the code
    tasks' scorers (:mod:`dultra_jax.tasks`) give, through the same ``CodeVerifier.score_tests``."""
    def run(inp: RewardInputs) -> list[float | None]:
        problems = [dict(e.tests or {}) for e in inp.examples]
        if any(p.get("kind") not in ("humaneval", "mbpp", "apps") for p in problems):
            raise RewardConfigError("code_tests needs code problems (HumanEval, MBPP or APPS examples)")
        return [1.0 if r.passed else 0.0 for r in ctx.code.score_tests(problems, list(inp.completions))]

    return run


def _exact_answer(ctx: RewardContext, opts: dict) -> RewardFn:
    from dultra_jax.data import synthetic

    return lambda inp: synthetic.exact_answer(inp.completions, inp.examples)


def _step_penalty(ctx: RewardContext, opts: dict) -> RewardFn:
    mode = opts.get("mode", "sum")
    scale = float(opts.get("scale", STEP_SCALE))

    def run(inp: RewardInputs) -> list[float | None]:
        if inp.trajectories is None:
            raise RewardConfigError("step_penalty needs the decoding trajectories (RewardInputs.trajectories)")
        return [step_penalty(t, mode, scale) for t in inp.trajectories]

    return run


def _teacher_logprob(ctx: RewardContext, opts: dict) -> RewardFn:
    def run(inp: RewardInputs) -> list[float | None]:
        import jax

        out: list[float | None] = [None] * len(inp.completions)
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(inp.examples):
            groups.setdefault(e.kind, []).append(i)
        kinds = list(groups)
        if ctx.teacher_plan is not None and jax.process_count() > 1:
            kinds = _agreed_kinds(ctx, groups)  # a teacher on several processes scores as a collective
        for kind in kinds:
            idx = groups.get(kind, [])
            student = None if inp.student_logprobs is None else [inp.student_logprobs[i] for i in idx]
            values = ctx.teacher(kind).rewards([list(inp.examples[i].messages) for i in idx],
                                               [inp.completions[i] for i in idx], student)
            for i, v in zip(idx, values, strict=True):
                out[i] = v
        return out

    return run


def _agreed_kinds(ctx: RewardContext, groups: Mapping[str, list[int]]) -> list[str]:
    """The problem kinds any process holds (each teacher's call is a collective that every process joins, with
    its rows of that kind or none); a kind without a configured teacher stops every process with one message."""
    from dultra_jax.parallel import gather_rows

    known = sorted(ctx.teacher_names)
    flags = np.asarray([[k in groups for k in known] + [any(k not in known for k in groups)]], np.int32)
    anywhere = gather_rows(flags).max(axis=0)
    if anywhere[-1]:
        raise RewardConfigError(f"a process holds problems of a kind without a teacher (configured: {known}); "
                                "add it under teachers: in the rewards YAML")
    return [k for k, present in zip(known, anywhere[:-1], strict=True) if present]


REWARDS: dict[str, Callable[[RewardContext, dict], RewardFn]] = {
    "math_correctness": _math_correctness,
    "answer_format": _texts(fmt.answer_format),
    "think_format": _texts(fmt.think_format),
    "code_fence_format": _texts(fmt.code_fence_format),
    "apps_execution": _apps_execution,
    "code_tests": _code_tests,
    "exact_answer": _exact_answer,
    "step_penalty": _step_penalty,
    "teacher_logprob": _teacher_logprob,
}


# ------------------------------------------------------------------------------------------- combination
@dataclass
class RewardOutput:
    per_function: dict[str, np.ndarray]  # unweighted, NaN where a function returned None
    weights: dict[str, float]
    total: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class RewardSet:
    """The weighted reward functions of one dataset."""

    dataset: str
    terms: list[tuple[str, float, RewardFn]]
    context: RewardContext

    @property
    def weights(self) -> dict[str, float]:
        return {name: w for name, w, _ in self.terms}

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs.completions)
        per: dict[str, np.ndarray] = {}
        total = np.zeros(n, np.float64)
        for name, weight, fn in self.terms:
            values = fn(inputs)
            if len(values) != n:
                raise RuntimeError(f"reward {name!r} returned {len(values)} values for {n} completions")
            arr = np.array([np.nan if v is None else float(v) for v in values], np.float64)
            per[name] = arr
            total += np.nan_to_num(weight * arr, nan=0.0)  # nansum over functions
        return RewardOutput(per_function=per, weights=self.weights, total=total)


def load_reward_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read and validate a rewards YAML (default: the package's ``rewards.yaml``, linked as
    ``configs/rewards.yaml``)."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise RewardConfigError(f"reward config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RewardConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise RewardConfigError(f"{path} is not valid YAML: {e}") from e
    validate_reward_config(cfg, source=str(path))
    return cfg


def validate_reward_config(cfg: Mapping[str, Any], *, source: str = "reward config") -> None:
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("datasets"), Mapping):
        raise RewardConfigError(f"{source}: needs a 'datasets' mapping of dataset -> {{reward: weight}}")
    sections = [(f"datasets.{d}", v) for d, v in cfg["datasets"].items()]
    sections += [(k, cfg.get(k) or {}) for k in ("thinking", "always")]
    for where, terms in sections:
        if not isinstance(terms, Mapping):
            raise RewardConfigError(f"{source}: {where} must map reward names to weights")
        for name, w in terms.items():
            if name not in REWARDS:
                raise RewardConfigError(f"{source}: {where} names unknown reward {name!r}; known: {sorted(REWARDS)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool):
                raise RewardConfigError(f"{source}: {where}.{name} weight must be a number, got {w!r}")
    mode = cfg.get("prompt_mode", "thinking")
    if mode not in ("thinking", "non-thinking"):
        raise RewardConfigError(f"{source}: prompt_mode must be 'thinking' or 'non-thinking', got {mode!r}")


def build_rewards(
    dataset: str,
    config: Mapping[str, Any] | str | Path | None = None,
    *,
    context: RewardContext | None = None,
    prompt_mode: str | None = None,
    freeze_unmasking_head: bool | None = None,
    exclude: Sequence[str] = (),
) -> RewardSet:
    """The weighted reward list of ``dataset`` as the original composes it (see the module docstring)."""
    cfg = load_reward_config(config) if not isinstance(config, Mapping) else dict(config)
    if isinstance(config, Mapping):
        validate_reward_config(cfg)
    datasets = cfg["datasets"]
    if dataset not in datasets:
        raise RewardConfigError(f"no rewards configured for dataset {dataset!r}; configured: {sorted(datasets)}")
    mode = prompt_mode or cfg.get("prompt_mode", "thinking")
    freeze = cfg.get("freeze_unmasking_head", False) if freeze_unmasking_head is None else freeze_unmasking_head
    weights: dict[str, float] = {}
    for section in (datasets[dataset], cfg.get("thinking") or {} if mode == "thinking" else {},
                    cfg.get("always") or {}):
        for name, w in section.items():
            weights[name] = float(w)
    if freeze and "step_penalty" in weights:
        weights["step_penalty"] = 0.0
    ctx = context or RewardContext(cfg.get("options"), cfg.get("teachers"))
    terms = [(name, w, REWARDS[name](ctx, ctx.opt(name))) for name, w in weights.items() if name not in exclude]
    return RewardSet(dataset=dataset, terms=terms, context=ctx)
