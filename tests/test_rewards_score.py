"""``dultra score``: completions JSONL in, per-sample verdicts and a summary out."""

import gzip
import json
from pathlib import Path

import datasets
import pytest

from dultra_jax.cli import main

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_gsm8k(tmp_path, capsys):
    rows = [json.loads(line) for line in (FIX / "gsm8k" / "test_sample.jsonl").open()][:6]
    answers = [r["answer"].split("####")[1].strip() for r in rows]
    comps = [{"index": i, "completion": f"<answer>\\boxed{{{a}}}</answer>"} for i, a in enumerate(answers[:4])]
    comps += [{"index": 4, "completion": "The answer is \\boxed{-1}"}, {"id": "gsm8k/5", "completion": ""}]
    out = tmp_path / "out"
    rc = main(["score", "--task", "gsm8k", "--completions-file", str(_write(tmp_path / "c.jsonl", comps)),
               "--data-file", str(FIX / "gsm8k" / "test_sample.jsonl"), "--out", str(out), "--workers", "2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(4 / 6) and summary["n"] == 6 and summary["n_correct"] == 4
    # GSM8K's one definition of correct: the evaluation's numeric parse (an empty completion has no answer)
    assert summary["counts"] == {"correct": 4, "wrong": 1, "no_answer": 1}
    assert "numeric parse" in summary["correct_means"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert [s["id"] for s in samples] == [f"gsm8k/{i}" for i in range(6)]
    assert samples[0]["extracted"] == float(answers[0]) and samples[0]["reference"] == answers[0]
    assert "accuracy 0.6667" in capsys.readouterr().out


def test_score_humaneval_bare_and_fenced(tmp_path):
    with gzip.open(FIX / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        probs = [json.loads(line) for line in f][:3]
    comps = [
        {"id": probs[0]["task_id"], "completion": probs[0]["canonical_solution"]},  # bare body
        {"id": probs[1]["task_id"], "completion": "```python\n" + probs[1]["prompt"] + probs[1]["canonical_solution"]
         + "```\nExplanation follows."},  # fenced whole function
        {"index": 2, "completion": "    return 0.5\n"},  # wrong
    ]
    out = tmp_path / "he"
    assert main(["score", "--task", "humaneval", "--completions-file", str(_write(tmp_path / "c.jsonl", comps)),
                 "--data-file", str(FIX / "humaneval" / "HumanEval.jsonl.gz"), "--out", str(out)]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert [s["correct"] for s in samples] == [True, True, False]
    assert json.loads((out / "summary.json").read_text())["accuracy"] == pytest.approx(2 / 3)


def test_score_apps_and_mbpp(tmp_path):
    apps = [json.loads(line) for line in (FIX / "tasks" / "apps_sample.jsonl").open()]
    comps = [{"id": str(r["problem_id"]), "completion": "```python\n" + json.loads(r["solutions"])[0] + "```"}
             for r in apps]
    out = tmp_path / "apps"
    assert main(["score", "--task", "apps", "--completions-file", str(_write(tmp_path / "a.jsonl", comps)),
                 "--data-file", str(FIX / "tasks" / "apps_sample.jsonl"), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["accuracy"] == 1.0
    mbpp = [json.loads(line) for line in (FIX / "tasks" / "mbpp_sample.jsonl").open()]
    comps = [{"id": r["task_id"], "completion": r["code"]} for r in mbpp]
    out = tmp_path / "mbpp"
    assert main(["score", "--task", "mbpp", "--completions-file", str(_write(tmp_path / "m.jsonl", comps)),
                 "--data-file", str(FIX / "tasks" / "mbpp_sample.jsonl"), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["n_correct"] == 3


def test_score_reports_bad_input_clearly(tmp_path, capsys):
    data = ["--data-file", str(FIX / "tasks" / "mbpp_sample.jsonl"), "--out", str(tmp_path / "o")]
    bad_id = _write(tmp_path / "b.jsonl", [{"id": "HumanEval/0", "completion": "x"}])
    assert main(["score", "--task", "mbpp", "--completions-file", str(bad_id), *data]) == 2
    assert "no problem with id 'HumanEval/0'" in capsys.readouterr().err
    no_key = _write(tmp_path / "n.jsonl", [{"completion": "x"}])
    assert main(["score", "--task", "mbpp", "--completions-file", str(no_key), *data]) == 2
    assert "needs an 'id' or 'index'" in capsys.readouterr().err
    (tmp_path / "j.jsonl").write_text("{not json\n")
    assert main(["score", "--task", "mbpp", "--completions-file", str(tmp_path / "j.jsonl"), *data]) == 2
    assert "j.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.json").exists()
