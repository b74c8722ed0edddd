"""The task table: every consumer looks a task up there, and each task has one definition of "correct"."""

import gzip
import json
from pathlib import Path

import pytest

from dultra_jax.cli import build_parser
from dultra_jax.data import DataError, synthetic
from dultra_jax.eval.harness import score
from dultra_jax.eval.score_file import score_completions
from dultra_jax.rewards.registry import REWARDS, RewardContext, RewardInputs
from dultra_jax.tasks import TASKS, Verifiers, get_task, make_example, task_names

FIX = Path(__file__).parent / "fixtures"


def _rows(path: Path, n: int) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line, _ in zip(f, range(n), strict=False)]


def test_every_record_is_complete():
    for t in TASKS.values():
        assert t.correctness_reward in REWARDS, t.name
        assert t.correct_means and t.commands <= {"train", "eval", "score"}
        assert (t.hub is None) == (t.from_row is None) == (t.build_tokenizer is not None), t.name
        if t.hub is not None:
            assert t.hub.name == t.name and t.hub.kind == t.kind


def test_cli_choices_are_the_table():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("eval", "score"):
        task_arg = next(a for a in sub[command]._actions if a.dest == "task")
        assert list(task_arg.choices) == task_names(command)


def test_lookup_errors_name_the_choices():
    with pytest.raises(DataError, match="unknown task 'gsm9k'.*gsm8k"):
        get_task("gsm9k")
    with pytest.raises(DataError, match="not available to score.*'gsm8k'"):
        get_task(synthetic.TASK_NAME, "score")
    assert get_task("GSM8K").name == "gsm8k"
    with pytest.raises(DataError, match="is generated"):
        make_example(synthetic.TASK_NAME, 0, {})


def test_generated_task_examples_and_model():
    t = get_task(synthetic.TASK_NAME)
    train, held_out = t.examples("train", limit=5, max_operand=3), t.examples("eval", limit=5, max_operand=3)
    assert [e.id for e in train] != [e.id for e in held_out]  # different seeds: held-out problems
    assert all(int(e.answer) <= 6 for e in train) and t.target_text(train[0]) == train[0].answer
    assert t.model_overrides["mask_token_id"] == synthetic.MASK_ID and t.kind == "synthetic"
    assert train[0].kind == "math"  # an example's kind picks its teacher: addition is arithmetic
    with pytest.raises(DataError, match="is generated"):
        t.examples("eval", data_file="x.jsonl")


def test_gsm8k_eval_and_score_agree(tmp_path):
    """One definition of correct: `dultra eval`'s scorer and `dultra score` give the same verdicts, including
    where the numeric parse and math-verify disagree (an unboxed final number)."""
    rows = _rows(FIX / "gsm8k" / "test_sample.jsonl", 4)
    examples = [make_example("gsm8k", i, r, style="eval") for i, r in enumerate(rows)]
    answers = [e.answer for e in examples]
    completions = [f"so the total is {answers[0]}",  # numeric parse: correct; no \boxed{} for math-verify
                   f"\\boxed{{{answers[1]}}}", "\\boxed{-1}", ""]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    comp_file = tmp_path / "c.jsonl"
    comp_file.write_text("".join(json.dumps({"index": i, "completion": c}) + "\n" for i, c in enumerate(completions)))
    evaluated = [v["correct"] for v in score("gsm8k", examples, completions)]
    summary = score_completions("gsm8k", comp_file, data_file=data, out_dir=tmp_path / "out")
    scored = [json.loads(line)["correct"] for line in (tmp_path / "out" / "samples.jsonl").open()]
    assert evaluated == scored == [True, True, False, False]
    assert summary["accuracy"] == 0.5 and "numeric parse" in summary["correct_means"]


def test_code_tests_reward_is_the_tasks_verdict():
    rows = _rows(FIX / "humaneval" / "HumanEval.jsonl.gz", 2)
    examples = [make_example("humaneval", i, r, style="eval") for i, r in enumerate(rows)]
    completions = [rows[0]["canonical_solution"], "    return None\n"]
    ctx = RewardContext({"code": {"workers": 1}})
    try:
        rewards = REWARDS["code_tests"](ctx, {})(RewardInputs(completions, examples))
    finally:
        ctx.close()
    with Verifiers(workers=1) as v:
        verdicts = get_task("humaneval").score(v, examples, completions)
    assert rewards == [1.0 if x["correct"] else 0.0 for x in verdicts] == [1.0, 0.0]


def test_docs_state_each_tasks_rule():
    """docs/evaluation.md's table says what the code counts as correct, task by task."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    for t in TASKS.values():
        assert f"| `{t.name}` | {t.correct_means} |" in text.replace("\\\\", "\\"), t.name
