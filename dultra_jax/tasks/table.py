"""The task table: one :class:`Task` record per task holds everything the package knows about it.

The trainer, ``dultra eval`` (the harness), ``dultra score``, the reward functions, the CLI's ``--task``
choices and the benchmarks look a task up here instead of branching on its name, so adding a task is one
record (and its functions) in this file. Each task has ONE definition of "correct" (:attr:`Task.score`), used by
``dultra eval``, ``dultra score`` and training-time evaluation alike (docs/evaluation.md says which per task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from dultra_jax.answers import extract_hash_answer, parse_apps_io
from dultra_jax.data import prompts as P
from dultra_jax.data import synthetic
from dultra_jax.data.tasks import DataError, Example, TaskSpec

Kind = Literal["math", "code", "synthetic"]
Command = Literal["train", "eval", "score"]
Verdict = dict[str, Any]  # correct (bool), status ("correct" | "wrong" | ...), and the scorer's details
# (verifiers with .math / .code pools, problems, completions) -> one verdict per completion
Scorer = Callable[[Any, Sequence[Example], Sequence[str]], list[Verdict]]
RowBuilder = Callable[[int, dict[str, Any], str, str], Example]  # (index, hub row, style, prompt_mode)
SYNTHETIC_DEFAULT_N = 64  # problems of the synthetic task when no limit is given


@dataclass(frozen=True)
class Task:
    """What one task is: where its problems come from, how a model reads them, and what counts as correct."""

    name: str
    kind: Kind
    score: Scorer  # the one definition of "correct" (eval, score, training-time evaluation)
    correct_means: str  # that definition in words (summaries and docs/evaluation.md)
    correctness_reward: str  # the GRPO reward term that pays for a correct answer (rewards.registry.REWARDS)
    hub: TaskSpec | None = None  # hub dataset, splits and required columns (None: generated)
    from_row: RowBuilder | None = None  # a hub-schema row -> Example
    build_tokenizer: Callable[[], Any] | None = None  # a built-in tokenizer; None: the model directory's
    model_overrides: Mapping[str, Any] = field(default_factory=dict)  # preset overrides a fresh model needs
    reference: Callable[[Example], str] | None = None  # the SFT / planner target text (None: worked solution)
    reward_weights: Mapping[str, float] | None = None  # GRPO rewards when configs/rewards.yaml has none
    commands: frozenset[str] = frozenset({"train", "eval", "score"})  # where --task accepts it

    def examples(self, style: str = "eval", *, split: str | None = None, data_file: str | Path | None = None,
                 limit: int | None = None, cache_dir: str | Path | None = None, prompt_mode: str = "thinking",
                 max_operand: int | None = None, **hub_options) -> list[Example]:
        """The task's problems with prompts in ``style`` ("train" or "eval"), the first ``limit`` of them.

        Generated tasks: ``style`` picks the seed (train 0, eval 1: held-out problems), ``limit`` the count."""
        if self.hub is None:
            if data_file is not None:
                raise DataError(f"task {self.name!r} is generated (no --data-file); use --limit for its size")
            n = SYNTHETIC_DEFAULT_N if limit is None else limit
            kw = {} if max_operand is None else {"max_operand": max_operand}
            return synthetic.addition_examples(n, seed=0 if style == "train" else 1, **kw)
        from dultra_jax.tasks.loading import load_task

        return load_task(self.name, split=split, data_file=data_file, style=style, prompt_mode=prompt_mode,
                         limit=limit, cache_dir=cache_dir, **hub_options)

    def target_text(self, example: Example) -> str:
        """What SFT and planner pre-training teach the model to write for ``example``."""
        return (self.reference or worked_solution)(example)

    def tokenizer(self, model_path: str | Path | None):
        """The built-in tokenizer, else the model directory's (AutoTokenizer, offline)."""
        if self.build_tokenizer is not None:
            return self.build_tokenizer()
        if model_path is None:
            raise DataError(f"task {self.name!r} needs the model directory's tokenizer: pass --model")
        from transformers import AutoTokenizer

        from dultra_jax.checkpoints.hub import resolve_model_path

        path = resolve_model_path(model_path)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise DataError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the checkpoint's "
                            "tokenizer into it (dultra convert does)")
        return AutoTokenizer.from_pretrained(str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def worked_solution(example: Example) -> str:
    """The row's worked reference solution (MATH ``solution``, HumanEval ``canonical_solution``, MBPP ``code``,
    GSM8K's full ``answer``), else the bare reference answer."""
    meta = example.metadata or {}
    for key in ("solution", "canonical_solution", "code", "answer"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    return str(example.answer or "")


# ------------------------------------------------------------------------------------------- scorers
def _score_exact(verifiers, examples: Sequence[Example], completions: Sequence[str]) -> list[Verdict]:
    ok = synthetic.exact_answer(completions, examples)
    return [{"correct": bool(v), "status": "correct" if v else "wrong", "reference": e.answer}
            for v, e in zip(ok, examples, strict=True)]


def _score_gsm8k(verifiers, examples: Sequence[Example], completions: Sequence[str]) -> list[Verdict]:
    """The original evaluation's numeric parse: |prediction - reference| < 1e-5."""
    from dultra_jax.rewards.math import gsm8k_eval_correct, gsm8k_prediction

    out = []
    for c, e in zip(completions, examples, strict=True):
        pred = gsm8k_prediction(c)
        ok = gsm8k_eval_correct(c, e.answer or "")
        out.append({"correct": ok, "status": "correct" if ok else ("no_answer" if pred is None else "wrong"),
                    "extracted": pred, "reference": e.answer})
    return out


def _score_math_verify(verifiers, examples: Sequence[Example], completions: Sequence[str]) -> list[Verdict]:
    """math-verify on the last ``\\boxed{}`` against the reference (string-normaliser fallback)."""
    checks = verifiers.math.check(list(completions), [str(e.answer) for e in examples])
    return [{"correct": c["correct"], "status": "correct" if c["correct"] else ("error" if c["error"] else "wrong"),
             "extracted": c["extracted"], "reference": c["reference"], "error": c["error"]} for c in checks]


def _code_scorer(method: str) -> Scorer:
    """The task's programs run in the sandbox against its tests (pass@1)."""
    def score(verifiers, examples: Sequence[Example], completions: Sequence[str]) -> list[Verdict]:
        tests = [dict(e.tests or {}) for e in examples]
        results = getattr(verifiers.code, method)(tests, list(completions))
        return [{"correct": r.passed, "status": r.status, "error": (r.error or "")[:500] or None,
                 "reward": r.reward, "tests_passed": r.tests_passed, "tests_total": r.tests_total}
                for r in results]
    return score


# ------------------------------------------------------------------------------------------- hub rows
def _messages(kind: str, style: str, prompt_mode: str, train_user: str, eval_user: str) -> tuple:
    if style == "train":
        system = P.math_system_prompt(prompt_mode) if kind == "math" else P.code_system_prompt(prompt_mode)
        return tuple(P.conversation(system, train_user))
    return ({"role": "user", "content": eval_user},)


def _gsm8k_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    q = str(row["question"])
    answer = extract_hash_answer(str(row["answer"]))
    if answer is None:
        raise DataError(f"gsm8k row {index}: answer has no '####' final answer")
    msgs = _messages("math", style, prompt_mode, q, P.math_eval_user_prompt(q))
    return Example("gsm8k", index, f"gsm8k/{index}", q, msgs, answer=answer, metadata=dict(row))


def _math500_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    q = str(row["problem"])
    # The reward extracts the last \boxed{} of the reference, so `answer` and `solution` agree.
    answer = row.get("answer") if row.get("answer") not in (None, "") else row.get("solution")
    if answer in (None, ""):
        raise DataError(f"math500 row {index}: needs an 'answer' or 'solution' column")
    msgs = _messages("math", style, prompt_mode, P.math_user_prompt(q), P.math_eval_user_prompt(q))
    return Example("math500", index, str(row.get("unique_id") or f"math500/{index}"), q, msgs, answer=str(answer),
                   metadata=dict(row))


def _dapo17_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    q = str(row["prompt"])
    msgs = _messages("math", style, prompt_mode, P.math_user_prompt(q), P.math_eval_user_prompt(q))
    return Example("dapo17", index, str(row.get("unique_id") or f"dapo17/{index}"), q, msgs,
                   answer=str(row["solution"]).strip(), metadata=dict(row))


def _apps_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    q = str(row["question"])
    io = parse_apps_io(row.get("input_output"))
    user = P.apps_user_prompt(q, row.get("starter_code") or "", prompt_mode if style == "train" else "non-thinking")
    tests = {"kind": "apps", "input_output": row.get("input_output"), "fn_name": io["fn_name"]}
    return Example("apps", index, str(row.get("problem_id", f"apps/{index}")), q,
                   _messages("code", style, prompt_mode, user, user), tests=tests, metadata=dict(row))


def _humaneval_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    prompt = str(row["prompt"])
    user = P.humaneval_instruct_prompt(prompt)
    tests = {"kind": "humaneval", "prompt": prompt, "test": row["test"], "entry_point": row["entry_point"]}
    return Example("humaneval", index, str(row["task_id"]), prompt, _messages("code", style, prompt_mode, user, user),
                   tests=tests, metadata=dict(row))


def _mbpp_row(index: int, row: dict[str, Any], style: str, prompt_mode: str) -> Example:
    text, test_list = str(row["text"]), list(row["test_list"])
    user = P.mbpp_instruct_prompt(text, test_list)
    return Example("mbpp", index, str(row["task_id"]), text, _messages("code", style, prompt_mode, user, user),
                   tests={"kind": "mbpp", "test_list": test_list}, metadata=dict(row))


# ------------------------------------------------------------------------------------------- the table
_TRAIN_EVAL = {"train": "train", "eval": "test"}
_MATH_VERIFY = "math-verify finds the last \\boxed{} answer equal to the reference (string-normaliser fallback)"
_PASS_AT_1 = "the program passes the task's lm-eval tests in the sandbox (pass@1)"
_ALL: tuple[Task, ...] = (
    Task("gsm8k", "math", _score_gsm8k, "the evaluation's numeric parse of the answer is within 1e-5 of the "
         "reference", "math_correctness",
         hub=TaskSpec("gsm8k", "math", "openai/gsm8k", "main", _TRAIN_EVAL, ("question", "answer")),
         from_row=_gsm8k_row),
    # Training reads ankner/math-500 (split "train"), evaluation HuggingFaceH4/MATH-500: the same problems.
    Task("math500", "math", _score_math_verify, _MATH_VERIFY, "math_correctness",
         hub=TaskSpec("math500", "math", "ankner/math-500", None, _TRAIN_EVAL, ("problem",),
                      eval_hub_id="HuggingFaceH4/MATH-500"),
         from_row=_math500_row),
    Task("dapo17", "math", _score_math_verify, _MATH_VERIFY, "math_correctness",
         hub=TaskSpec("dapo17", "math", "open-r1/DAPO-Math-17k-Processed", "en", {"train": "train", "eval": "train"},
                      ("prompt", "solution")),
         from_row=_dapo17_row, commands=frozenset({"train", "score"})),
    Task("apps", "code", _code_scorer("score_apps"), "the program passes every APPS test in the sandbox",
         "apps_execution",
         hub=TaskSpec("apps", "code", "codeparrot/apps", None, _TRAIN_EVAL, ("question", "input_output")),
         from_row=_apps_row, commands=frozenset({"train", "score"})),
    Task("humaneval", "code", _code_scorer("score_humaneval"), _PASS_AT_1, "code_tests",
         hub=TaskSpec("humaneval", "code", "openai/openai_humaneval", None, {"train": "test", "eval": "test"},
                      ("task_id", "prompt", "test", "entry_point")),
         from_row=_humaneval_row),
    Task("mbpp", "code", _code_scorer("score_mbpp"), _PASS_AT_1, "code_tests",
         hub=TaskSpec("mbpp", "code", "google-research-datasets/mbpp", "full", _TRAIN_EVAL,
                      ("task_id", "text", "test_list")),
         from_row=_mbpp_row),
    # Small additions "a+b=" with a character tokenizer: the CPU demo and the tests (nothing downloaded).
    Task(synthetic.TASK_NAME, "synthetic", _score_exact, "the text before end of turn is exactly the sum",
         "exact_answer",
         build_tokenizer=synthetic.build_tokenizer, model_overrides=MappingProxyType(synthetic.MODEL_OVERRIDES),
         reference=synthetic.answer_text, reward_weights=MappingProxyType({"exact_answer": 1.0, "step_penalty": 0.1}),
         commands=frozenset({"train", "eval"})),
)
TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in _ALL})


def task_names(command: Command | None = None) -> list[str]:
    """The tasks ``command`` accepts (all tasks when None), in table order."""
    return [t.name for t in _ALL if command is None or command in t.commands]


def get_task(name: str, command: Command | None = None) -> Task:
    """The task called ``name`` (case-insensitive); an unknown name, or one ``command`` does not take, names
    the choices."""
    task = TASKS.get(str(name).lower())
    if task is None or (command is not None and command not in task.commands):
        what = "unknown task" if task is None else f"task {name!r} is not available to {command}:"
        raise DataError(f"{what} {name!r}; choose one of {task_names(command)}" if task is None
                        else f"{what} choose one of {task_names(command)}")
    return task
