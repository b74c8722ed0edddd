"""Streamed conversation sources (dultra_jax.data.sources), offline: the tiny Nemotron-layout fixture read as a
local directory and as a hub id from a hub cache; the original's sequence building; the stream position resumed
by a checkpointed planner run."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from dultra_jax.data.sources import (
    EOT,
    ConversationStream,
    RowOpener,
    encode_conversation,
    sequence_batches,
    source_spec,
)
from dultra_jax.data.tasks import DataError

FIXTURES = Path(__file__).parent / "fixtures"
NEMOTRON = FIXTURES / "nemotron-tiny"
TOKENIZER = FIXTURES / "llada-tokenizer-tiny"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch) -> str:
    """The fixture as hub dataset ``test/nemotron-tiny`` in an offline hub cache (blobs + snapshot links)."""
    storage = tmp_path / "hub" / "datasets--test--nemotron-tiny"
    snap = storage / "snapshots" / ("0" * 40)
    for f in sorted((NEMOTRON / "data").iterdir()):
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / "data").mkdir(parents=True, exist_ok=True)
        (snap / "data" / f.name).symlink_to(os.path.relpath(blob, snap / "data"))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return "test/nemotron-tiny"


def _uuids(it, n):
    return [next(it)["uuid"] for _ in range(n)]


def test_splits_interleave_and_an_epoch_ends_with_the_first_split_that_runs_out(hub_dataset):
    it = iter(ConversationStream(RowOpener(hub_dataset, ["math", "code"])))
    # math has 7 rows, code 5: m0 c0 ... m4 c4 m5, then code runs out and the next epoch starts
    first = _uuids(it, 13)
    assert first[:11] == [f"{s}-{i}" for i in range(5) for s in ("math", "code")] + ["math-5"]
    assert first[11:] == ["math-0", "code-0"] and it.get_state()["epoch"] == 1
    local = iter(ConversationStream(RowOpener(str(NEMOTRON), ["math", "code"])))  # a local directory: the same
    assert _uuids(local, 13) == first
    with pytest.raises(DataError, match="split 'stem'"):
        RowOpener(str(NEMOTRON), ["math", "stem"])
    with pytest.raises(DataError, match="not in the hub cache"):
        RowOpener("test/absent", ["math"])


def test_sequences_are_built_as_the_original_builds_them(tok):
    row = json.loads((NEMOTRON / "chat.jsonl").read_text().splitlines()[0])
    msgs = source_spec("chat").messages(row)
    ids, plen = encode_conversation(tok, msgs, 96, pad_id=298)
    prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    answer = re.sub(r"<think>.*?</think>", "", msgs[-1]["content"], flags=re.DOTALL)
    assert "<think>" in msgs[-1]["content"] and "<think>" not in answer
    want = tok(prompt + answer + EOT, add_special_tokens=False)["input_ids"]
    assert ids.shape == (96,) and ids[:len(want)].tolist() == want and (ids[len(want):] == 298).all()
    assert plen == len(tok(prompt, add_special_tokens=False)["input_ids"]) < len(want)
    assert tok.decode(ids[plen:len(want)]) == answer + EOT
    short, short_plen = encode_conversation(tok, msgs, 8, pad_id=298)  # truncated; the prompt length capped
    assert short.tolist() == want[:8] and short_plen == 8
    s1k = source_spec("s1k").messages({"question": "Q?", "thinking_trajectories": ["T"], "attempt": "A"})
    assert s1k[0]["content"].startswith("Respond in the following format:") and s1k[0]["content"].endswith("Q?")
    assert s1k[1]["content"] == "<reasoning>T</reasoning>\n<answer>A</answer>"


def test_each_process_tokenises_its_share_and_a_restored_stream_continues(tok):
    def batches(shard_index=0, shard_count=1):
        return iter(sequence_batches("chat", str(NEMOTRON / "chat.jsonl"), None, tok, batch_size=2, max_length=48,
                                     pad_id=298, shard_index=shard_index, shard_count=shard_count))

    whole = batches()
    seen = [next(whole) for _ in range(4)]  # 3 rows: batches run across the epoch boundary
    assert seen[0]["input_ids"].shape == (2, 48) and seen[0]["row"].tolist() == [0, 1]
    halves = [batches(i, 2) for i in range(2)]
    for b in seen[:2]:
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), b["input_ids"])
        assert [p["row"].tolist() for p in parts] == [[0], [1]]
    cut = batches()
    next(cut)
    state = json.loads(json.dumps(cut.get_state()))  # what a checkpoint stores
    resumed = batches()
    resumed.set_state(state)
    for b in seen[1:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], b["input_ids"])


def test_planner_pretraining_streams_nemotron_and_resumes_where_it_stopped(hub_dataset, tiny_dir, tmp_path):
    """A planner run on the hub dataset (offline) stops after 2 steps; a resumed trainer draws the batch an
    uninterrupted stream gives third; the noise is per global row, so the batch is the same on any process."""
    from dultra_jax.training.config import load_run_config
    from dultra_jax.training.trainer import Trainer

    def cfg(steps):
        return load_run_config(None, [
            f"model.path={tiny_dir}", f"task.tokenizer={TOKENIZER}", "train.mode=planner", "train.batch_size=2",
            f"train.max_steps={steps}", "train.save_every=2", "data.source=nemotron", f"data.path={hub_dataset}",
            "data.max_length=48", "sequence.min_block=8", "optim.learning_rate=1e-3"])

    out = tmp_path / "planner"
    rows = Trainer(cfg(2), out, progress=False).run()
    assert np.isfinite(rows["loss"]) and rows["step"] == 2
    again = Trainer(cfg(3), out, progress=False)
    assert again._restore() and again.step == 2
    got = again._streamed_rows()
    stream = iter(sequence_batches("nemotron", hub_dataset, None, again.tokenizer, batch_size=2, max_length=48,
                                   pad_id=298))
    want = [next(stream) for _ in range(3)][-1]
    np.testing.assert_array_equal(got[0], want["input_ids"])
    np.testing.assert_array_equal(got[2], want["prompt_length"])
