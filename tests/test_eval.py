"""Evaluation harness: end to end per task on a tiny model, scoring, NFE/TPF arithmetic, batching, sweep, plot.

One compiled decoding loop serves most tests: every run here uses the same settings (planner, gen 16, block 8,
batch 2) and pads prompts to the same width (--pad-multiple 1024 on a model whose max_sequence_length is 1024).
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dultra_jax.cli import main
from dultra_jax.data import synthetic
from dultra_jax.eval import (
    EvalError,
    EvalSettings,
    accuracy_over_seeds,
    decode_prompts,
    distribution,
    encode_prompts,
    excluded_ids,
    load_examples,
    score,
    speed_summary,
    tpf,
)
from dultra_jax.eval.plot import load_points, plot_accuracy_vs_nfe

FIX = Path(__file__).parent / "fixtures"
DATA = {
    "gsm8k": FIX / "gsm8k" / "test_sample.jsonl",
    "math500": FIX / "tasks" / "math500_sample.jsonl",
    "humaneval": FIX / "humaneval" / "HumanEval.jsonl.gz",
    "mbpp": FIX / "tasks" / "mbpp_sample.jsonl",
}
COMMON = ["--gen-length", "16", "--block-length", "8", "--batch-size", "2", "--dtype", "fp32", "--pad-multiple",
          "1024", "--workers", "2"]
SAMPLE_KEYS = {"seed", "id", "index", "prompt", "completion", "correct", "status", "nfe", "effective_tokens",
               "equivalent_forwards", "masks_left", "time_s", "batch_rows"}
SUMMARY_KEYS = {"task", "label", "n_problems", "seeds", "n_samples", "accuracy", "accuracy_std", "accuracy_per_seed",
                "mean_nfe", "tpf", "mean_effective_tokens", "positions_per_s", "effective_tokens_per_s",
                "decode_time_s", "batch_size", "prompt_length", "gen_length", "block_length", "settings", "device",
                "commit", "excluded_ids", "model", "dtype"}


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
        yield


@pytest.fixture(scope="module")
def model_dir(char_model_dir) -> Path:
    return char_model_dir(1024)


@pytest.fixture(scope="module")
def model(model_dir):
    import dultra_jax

    return dultra_jax.load(model_dir, dtype="fp32")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("task", ["gsm8k", "math500", "humaneval", "mbpp"])
def test_eval_task_end_to_end(task, model_dir, tmp_path, capsys):
    seeds = ["0", "1"] if task == "gsm8k" else ["0"]
    out = tmp_path / task
    rc = main(["eval", "--model", str(model_dir), "--task", task, "--data-file", str(DATA[task]), "--limit", "2",
               "--seeds", *seeds, "--out", str(out), *COMMON])
    assert rc == 0
    rows = _rows(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 2 * len(seeds) == summary["n_samples"]
    for r in rows:
        assert r.keys() >= SAMPLE_KEYS
        assert isinstance(r["correct"], bool) and isinstance(r["completion"], str)
        assert 1 <= r["nfe"] <= 16 and 0 <= r["effective_tokens"] <= 16 and r["time_s"] > 0
        assert r["prompt"].startswith("<|start_header_id|>user<|end_header_id|>")
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["task"] == task and summary["n_problems"] == 2 and summary["seeds"] == [int(s) for s in seeds]
    assert summary["gen_length"] == 16 and summary["block_length"] == 8 and summary["batch_size"] == 2
    assert summary["settings"]["strategy"] == "planner" and summary["settings"]["reveal"] == "bernoulli"
    assert summary["excluded_ids"] == sorted({synthetic.EOT_ID, synthetic.EOS_ID, synthetic.MASK_ID})
    # the summary's figures are the rows' arithmetic
    nfe = np.array([r["nfe"] for r in rows], float)
    eff = np.array([r["effective_tokens"] for r in rows], float)
    assert summary["mean_nfe"] == pytest.approx(nfe.mean())
    assert summary["tpf"] == pytest.approx(eff.mean() / nfe.mean())
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert summary["positions_per_s"] * summary["decode_time_s"] == pytest.approx(len(rows) * 16)
    assert summary["effective_tokens_per_s"] * summary["decode_time_s"] == pytest.approx(eff.sum())
    # continuous batching pads to its length buckets, within what the model's positions allow
    assert summary["padded_prompt_widths"] and all(summary["prompt_length"]["max"] <= w <= 1008
                                                   for w in summary["padded_prompt_widths"])
    assert set(summary["accuracy_per_seed"]) == set(seeds)
    assert "accuracy" in capsys.readouterr().out


def test_batching_does_not_change_results(model):
    """Sorted, padded batches with a filled-up last batch, and continuous batching through 2 slots, give each
    problem exactly its batch-1 decoding."""
    tok = synthetic.build_tokenizer()
    examples = synthetic.addition_examples(3, seed=5)
    _, prompts = encode_prompts(tok, examples)
    exclude = excluded_ids(model.cfg.eos_token_id, model.cfg.pad_token_id, tok)
    runs = {}
    for b, batching in ((1, "batched"), (2, "batched"), ("slots", "continuous")):
        s = EvalSettings.create(gen_length=16, block_length=8, batch_size=2 if b == "slots" else b, pad_multiple=1024,
                         batching=batching)
        runs[b] = decode_prompts(model, prompts, s, seed=3, row_seeds=[e.index for e in examples], exclude=exclude)
    for other in (2, "slots"):
        for one, two in zip(runs[1].samples, runs[other].samples, strict=True):
            np.testing.assert_array_equal(one["ids"], two["ids"])
            assert one["nfe"] == two["nfe"] and one["effective_tokens"] == two["effective_tokens"]
    assert len({tuple(s["ids"].tolist()) for s in runs[1].samples}) > 1  # problems decode differently
    assert [b["rows"] for b in runs[2].batches] == [2, 1]
    assert sum(s["batch_rows"] == 1 for s in runs[2].samples) == 1


@pytest.mark.parametrize("tokenizer", ["char", "llada"])
def test_harness_encodes_and_decodes_through_text_model(tokenizer, model, tiny_text_dir, monkeypatch, tmp_path):
    """The harness hands the decoder TextModel's ids (the server's, with the tokenizer's default special tokens:
    LLaDA's BOS first) for each example and records TextModel's text of each answer."""
    from dultra_jax.checkpoints.tokenizer import load_tokenizer
    from dultra_jax.eval import DecodeRun, evaluate, harness
    from dultra_jax.text import TextModel

    if tokenizer == "char":
        tok, examples = synthetic.build_tokenizer(), synthetic.addition_examples(2, seed=5)
    else:
        tok = load_tokenizer(tiny_text_dir)
        examples = load_examples("gsm8k", data_file=DATA["gsm8k"], limit=2)
    tm = TextModel(model, tok)
    want = [tm.encode(list(e.messages)) for e in examples]
    assert tokenizer == "char" or all(ids[0] == tok.bos_token_id for ids in want)
    answers = [np.array([tok.eos_token_id, 7, 40, 299, 45]), np.array([299, 299, 12, 33, 34])]  # special, MASK
    seen = []

    def fake_decode(model, prompts, settings, *, on_batch, **kw):  # the decoder, minus the decoding
        seen.extend(list(p) for p in prompts)
        samples = [dict(ids=a, nfe=1, effective_tokens=1, equivalent_forwards=1.0, masks_left=0, time_s=0.1,
                        batch_rows=2, width=8) for a in answers]
        on_batch([0, 1], samples, {"rows": 2})
        return DecodeRun(samples=samples, batches=[{"rows": 2, "width": 8, "time_s": 0.2}])

    monkeypatch.setattr(harness, "decode_prompts", fake_decode)
    summary = evaluate(model, tok, examples, EvalSettings.create(gen_length=16, block_length=8), task="gsm8k",
                       progress=False, warmup=False, out_dir=tmp_path,
                       scorer=lambda exs, comps: [{"correct": False} for _ in exs])
    assert seen == want == encode_prompts(tok, examples)[1]
    rows = _rows(tmp_path / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [tm.render(e.messages) for e in examples]
    assert [r["completion"] for r in rows] == [tm.decode(a) for a in answers]
    assert all(r["completion"] for r in rows) and summary["excluded_ids"] == sorted(tm.excluded)


def test_factor_sweep_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["eval", "--model", str(model_dir), "--task", "synthetic-addition", "--limit", "2",
                 "--factor-sweep", "--factors", "1.0", "--out", str(out), *COMMON]) == 0
    index = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in index] == ["factor f=1 b8", "planner-bernoulli f=1 b8"]
    for name, strategy in (("factor-f1", "factor"), ("planner-f1", "planner")):
        s = json.loads((out / name / "summary.json").read_text())
        assert s["settings"]["strategy"] == strategy and s["settings"]["factor"] == 1.0
        assert len(_rows(out / name / "samples.jsonl")) == 2
    plots = tmp_path / "plots"
    assert main(["plot", "--summaries", str(out), "--out", str(plots)]) == 0
    assert (plots / "accuracy_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (plots / "accuracy_vs_nfe.svg").read_text()
    assert "wrote" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- scoring
def test_scoring_known_correct_and_wrong():
    gsm = load_examples("gsm8k", data_file=DATA["gsm8k"], limit=2)
    got = score("gsm8k", gsm, [f"so the total is \\boxed{{{gsm[0].answer}}}", "The answer is 1234567."])
    assert [g["correct"] for g in got] == [True, False] and got[1]["status"] == "wrong"
    assert score("gsm8k", gsm[:1], ["no number here"])[0]["status"] == "no_answer"

    math = load_examples("math500", data_file=DATA["math500"], limit=2)
    got = score("math500", math, ["$\\frac12+\\frac14 = \\boxed{0.75}$", "\\boxed{17}"], workers=2)
    assert [g["correct"] for g in got] == [True, False]

    with gzip.open(DATA["humaneval"], "rt") as f:
        he_rows = [json.loads(line) for line in f][:2]
    he = load_examples("humaneval", data_file=DATA["humaneval"], limit=2)
    got = score("humaneval", he, ["```python\n" + he_rows[0]["prompt"] + he_rows[0]["canonical_solution"] + "```",
                                  "    return []\n"], workers=2)
    assert [g["correct"] for g in got] == [True, False]

    mbpp = load_examples("mbpp", data_file=DATA["mbpp"], limit=2)
    got = score("mbpp", mbpp, [mbpp[0].metadata["code"], "def is_not_prime(n):\n    return True\n"], workers=2)
    assert [g["correct"] for g in got] == [True, False]

    add = synthetic.addition_examples(2, seed=1)
    got = score("synthetic-addition", add, [add[0].answer, str(int(add[1].answer) + 1)])
    assert [g["correct"] for g in got] == [True, False]


# ------------------------------------------------------------------------------------------- arithmetic
def test_tpf_nfe_arithmetic_on_hand_made_rows():
    rows = [
        {"seed": 0, "correct": True, "nfe": 4, "effective_tokens": 8, "equivalent_forwards": 4.0},
        {"seed": 0, "correct": False, "nfe": 2, "effective_tokens": 2, "equivalent_forwards": 1.5},
        {"seed": 1, "correct": True, "nfe": 6, "effective_tokens": 12, "equivalent_forwards": 6.0},
        {"seed": 1, "correct": True, "nfe": 4, "effective_tokens": 2, "equivalent_forwards": 4.0},
    ]
    batches = [{"rows": 2, "time_s": 0.5, "effective_tokens": 10}, {"rows": 2, "time_s": 1.5, "effective_tokens": 14}]
    s = speed_summary(rows, batches, gen_length=16)
    assert s["mean_nfe"] == 4.0 and s["mean_effective_tokens"] == 6.0
    assert s["tpf"] == pytest.approx(6.0 / 4.0)  # ratio of means, not the mean of ratios (1.5625)
    assert s["tpf_distribution"]["mean"] == pytest.approx((2 + 1 + 2 + 0.5) / 4)
    assert s["mean_equivalent_forwards"] == pytest.approx(3.875)
    assert s["decode_time_s"] == 2.0 and s["positions_per_s"] == pytest.approx(4 * 16 / 2.0)
    assert s["effective_tokens_per_s"] == pytest.approx(24 / 2.0)
    a = accuracy_over_seeds(rows)
    assert a["accuracy_per_seed"] == {"0": 0.5, "1": 1.0} and a["accuracy"] == 0.75
    assert a["accuracy_std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert accuracy_over_seeds(rows[:2])["accuracy_std"] == 0.0
    assert tpf([3, 5], [0, 0]) == 0.0
    d = distribution([1, 2, 3, 4, 10])
    assert (d["mean"], d["p50"], d["min"], d["max"]) == (4.0, 3.0, 1.0, 10.0)
    assert d["p90"] == pytest.approx(7.6)


# ------------------------------------------------------------------------------------------- errors and plot
def test_clear_errors(model_dir, tmp_path, capsys):
    with pytest.raises(EvalError, match="multiple of block_length"):
        EvalSettings.create(gen_length=10, block_length=4)
    with pytest.raises(EvalError, match="batch_size"):
        EvalSettings.create(batch_size=0)
    with pytest.raises(EvalError, match="--limit"):
        load_examples("gsm8k", data_file=DATA["gsm8k"], limit=0)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    shutil.copy(model_dir / "config.json", no_tok / "config.json")
    assert main(["eval", "--model", str(no_tok), "--task", "mbpp", "--data-file", str(DATA["mbpp"])]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "synthetic-addition", "--seeds", "1", "1"]) == 2
    assert "repeated" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--task", "humaneval", "--data-file", str(DATA["humaneval"]),
                 "--limit", "1", "--gen-length", "1024", "--block-length", "32"]) == 2
    assert "'HumanEval/0'" in capsys.readouterr().err
    assert main(["plot", "--summaries", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_plot_from_hand_made_summaries(tmp_path):
    paths = []
    for i, (series, label, nfe, acc) in enumerate([("factor", "f=0.5", 40.0, 0.70), ("factor", "f=1", 30.0, 0.65),
                                                   ("planner-bernoulli", "f=1", 20.0, 0.72)]):
        p = tmp_path / f"s{i}.json"
        p.write_text(json.dumps({"task": "gsm8k", "series": series, "point_label": label, "accuracy": acc,
                                 "accuracy_std": 0.01, "mean_nfe": nfe, "gen_length": 256, "block_length": 32}))
        paths.append(p)
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps([{"method": "threshold", "accuracy": 0.5, "nfe": 12.0, "tpf": 1.3}]))
    points = load_points([*paths, demo])
    assert [(p["series"], p["nfe"]) for p in points][:3] == [("factor", 40.0), ("factor", 30.0),
                                                           ("planner-bernoulli", 20.0)]
    assert points[3]["task"] == "demo"
    written = plot_accuracy_vs_nfe(points, tmp_path / "out", title="test")
    assert [p.name for p in written] == ["accuracy_vs_nfe.png", "accuracy_vs_nfe.svg"]
    assert all(p.stat().st_size > 1000 for p in written)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"accuracy": 1.0}))
    with pytest.raises(EvalError, match="not an evaluation summary"):
        load_points([bad])
