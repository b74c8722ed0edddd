"""Weights & Biases logging in offline mode (WANDB_MODE=offline, WANDB_DIR in tmp): the trainer's metrics rows
and ``dultra eval --wandb`` summaries reach a real wandb run; a resumed training run continues the same run."""

import json
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from dultra_jax.cli import main  # noqa: E402
from dultra_jax.training.config import load_run_config  # noqa: E402
from dultra_jax.training.trainer import MetricsWriter, Trainer  # noqa: E402
from dultra_jax.wandb_sink import RUN_ID_FILE, WandbSink, log_eval_summaries  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "wandb-dir"
    root.mkdir()
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_PROJECT": "dultra-test"}.items():
        monkeypatch.setenv(k, v)
    return root


def _records(root: Path, run_id: str, *expected: bytes, count: int = 1) -> list[bytes]:
    """The raw bytes of each offline segment of ``run_id`` (history keys and JSON values are stored verbatim).

    wandb's service may still be writing a segment just after ``finish()``; wait (up to 30 s) until there are
    ``count`` segments and the last holds every ``expected`` string."""
    deadline = time.monotonic() + 30
    while True:
        files = sorted(root.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
        data = [f.read_bytes() for f in files]
        if (len(data) == count and all(e in data[-1] for e in expected)) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def _cfg(*over):
    return load_run_config(None, [
        "model.preset=tiny", "model.overrides={d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 2, "
        "mlp_hidden_size: 64}", "task.num_train=16", "task.num_eval=4", "task.max_operand=4", "train.mode=sft",
        "train.batch_size=4", "train.save_every=2", "sequence.gen_length=8", "logging.wandb=true", *over])


def test_trainer_logs_its_rows(offline, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg("train.max_steps=1"), out, progress=False).run()
    run_id = (out / RUN_ID_FILE).read_text().strip()
    [row] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    [data] = _records(offline, run_id, json.dumps(row["grad_norm"]).encode())
    assert b"grad_norm" in data and b"dultra-test" in data
    assert json.dumps(row["loss"]).encode() in data and json.dumps(row["grad_norm"]).encode() in data


def test_a_resumed_run_continues_the_same_wandb_run(offline, tmp_path):
    """What the trainer does on a re-run in its output directory: the same run id, one more offline segment."""
    out = tmp_path / "resumed"
    ids = []
    for step in (1, 2):
        out.mkdir(exist_ok=True)
        writer = MetricsWriter(out, wandb=WandbSink(out, job_type="sft", resumable=True))
        writer.write({"step": step, "loss": 0.5 / step, "note": "not a metric"})
        writer.close()
        ids.append((out / RUN_ID_FILE).read_text().strip())
    assert ids[0] == ids[1]
    first, second = _records(offline, ids[0], b"0.25", count=2)
    assert b"0.5" in first and b"0.25" in second and b"not a metric" not in second


def test_eval_summaries_are_logged(offline, tmp_path, tiny_dir, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_dir), "--task", "synthetic-addition", "--limit", "2", "--gen-length",
                 "8", "--block-length", "8", "--batch-size", "2", "--pad-multiple", "8", "--dtype", "fp32",
                 "--out", str(out), "--wandb"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    [run_dir] = list(offline.glob("wandb/offline-run-*"))
    [data] = _records(offline, run_dir.name.rsplit("-", 1)[1], json.dumps(summary["tpf"]).encode())
    for key in ("accuracy", "mean_nfe", "tpf"):
        assert key.encode() in data and json.dumps(summary[key]).encode() in data
    # a sweep: one step per run, figures under the run's label
    rows = [{"label": "a", "accuracy": 0.25, "mean_nfe": 3.0}, {"label": "b", "accuracy": 0.75, "mean_nfe": 1.5}]
    files = Path(log_eval_summaries(rows, tmp_path / "sweep", name="sweep"))
    [data] = _records(offline, files.parent.name.rsplit("-", 1)[1], b"b/mean_nfe")
    assert b"a/accuracy" in data and b"b/mean_nfe" in data and b"0.75" in data


def test_sampled_completions_reach_jsonl_and_a_wandb_table(offline, tmp_path):
    """MetricsWriter.write_samples: appended to samples.jsonl, and a wandb table of the same rows."""
    from dultra_jax.training.samples import sample_rows

    out = tmp_path / "samples"
    out.mkdir()
    writer = MetricsWriter(out, wandb=WandbSink(out, job_type="grpo", resumable=True))
    rows = sample_rows(3, prompts=["1+2=", "2+2="], completions=["3<|eot_id|>", "five"],
                       per_function={"exact_answer": [1.0, 0.0], "teacher_logprob": [-0.5, float("nan")]},
                       totals=[1.0, 0.0], advantages=[0.7, -0.7], nfe=[2, 4], lengths=[2, 4],
                       terminated=[True, False], count=2)
    writer.write_samples(3, rows)
    writer.write({"step": 3, "loss": 0.125})
    writer.close()
    logged = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert logged == rows and logged[1]["truncated"] and logged[1]["rewards"]["teacher_logprob"] is None
    run_id = (out / RUN_ID_FILE).read_text().strip()
    [data] = _records(offline, run_id, b"samples")
    assert b"samples" in data and b"table-file" in data
    tables = list(offline.glob(f"wandb/offline-run-*-{run_id}/files/media/table/samples_*.table.json"))
    [table] = [json.loads(t.read_text()) for t in tables]
    assert table["columns"][:3] == ["row", "prompt", "completion"] and "reward/exact_answer" in table["columns"]
    assert [r[2] for r in table["data"]] == ["3<|eot_id|>", "five"]
