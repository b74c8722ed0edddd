"""Streamed conversation sources for SFT and planner pre-training: the original's Nemotron posts, s1K, chat JSONL.

The original pre-trains the planner on ``nvidia/Nemotron-Post-Training-Dataset-v1`` (splits ``math`` and
``code``, streamed, interleaved one row from each in turn until one runs out); ``s1k`` (``simplescaling/s1K``)
and any chat JSONL with a ``messages`` column are read the same way. Every row becomes one fixed-length sequence
as the original builds it (docs/training-data.md):

- prompt = the tokenizer's chat template over all messages but the last, with the generation prompt;
- answer = the last message's content with every ``<think>...</think>`` span deleted;
- ids = tokenise(prompt + answer + ``<|eot_id|>``) without special tokens, truncated / right-padded (pad id) to
  ``max_length`` (512); ``prompt_length`` = min(len(tokenise(prompt)), max_length).

Nothing is tokenised ahead: :class:`ConversationStream` is a grain ``IterDataset`` over the raw rows (JSON, or
parquet read a batch at a time), and each process tokenises only its own rows of each batch, when the batch is
drawn. Its iterator's state (epoch, rows read from each split, whose turn it is) is a small dict that a
checkpoint stores; a restored iterator re-opens the splits and skips the rows already read (reading, not
tokenising, them), so a resumed run continues with the batch it would have drawn next.

Where rows come from (``path``): a hub dataset id ``org/name[@revision]`` (read with ``datasets`` streaming; with
``HF_HUB_OFFLINE=1``, the cached snapshot's files), a local directory in the hub's layout (per split, files named
``<split>-*.parquet|jsonl`` or ``<split>.parquet|jsonl`` anywhere under it, or a ``<split>/`` folder of them), or
one local ``.jsonl`` / ``.parquet`` file (one split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from dultra_jax.data.tasks import DataError

EOT = "<|eot_id|>"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
S1K_SYSTEM = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n...\n"
              "</answer>")


@dataclass(frozen=True)
class SourceSpec:
    """A named source: where it is by default, its splits, and how a row becomes a conversation."""

    name: str
    default_path: str | None
    default_splits: tuple[str, ...]
    messages: Callable[[dict[str, Any]], list[dict[str, str]]]


def _messages_column(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages")
    if not isinstance(msgs, (list, tuple)) or len(msgs) < 2:
        raise DataError(f"a row without a 'messages' list of at least 2 turns (columns: {sorted(row)}); chat "
                        "sources need [{'role': ..., 'content': ...}, ...] ending with the assistant's answer")
    return [{"role": m["role"], "content": m.get("content") or ""} for m in msgs]


def _s1k_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """s1K's question, first thinking trajectory and attempt in the original's <reasoning>/<answer> format."""
    try:
        thinking = row["thinking_trajectories"][0]
        answer = f"<reasoning>{thinking}</reasoning>\n<answer>{row['attempt']}</answer>"
        return [{"role": "user", "content": S1K_SYSTEM + "\n\n" + row["question"]},
                {"role": "assistant", "content": answer}]
    except (KeyError, IndexError, TypeError) as e:
        raise DataError(f"an s1k row lacks question / thinking_trajectories / attempt ({e}); columns: "
                        f"{sorted(row)}") from e


SOURCES: dict[str, SourceSpec] = {
    "nemotron": SourceSpec("nemotron", "nvidia/Nemotron-Post-Training-Dataset-v1", ("math", "code"),
                           _messages_column),
    "s1k": SourceSpec("s1k", "simplescaling/s1K", ("train",), _s1k_messages),
    "chat": SourceSpec("chat", None, ("train",), _messages_column),
}


def source_spec(name: str) -> SourceSpec:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)} (or 'task')")
    return SOURCES[name]


# --------------------------------------------------------------------------------------------- encoding
def strip_thinking(text: str) -> str:
    return _THINK.sub("", text)


def encode_conversation(tokenizer, messages: Sequence[dict[str, str]], max_length: int, pad_id: int
                        ) -> tuple[np.ndarray, int]:
    """(ids int32 [max_length], prompt length) of one conversation, as the original builds its sequences."""
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=False)
    text = prompt + strip_thinking(messages[-1]["content"]) + EOT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    out = np.full(max_length, pad_id, np.int32)
    out[:len(ids)] = ids
    return out, min(prompt_length, max_length)


# --------------------------------------------------------------------------------------------- reading rows
def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of a hub dataset when offline (HF_HUB_OFFLINE=1), else None (stream it)."""
    from dultra_jax.checkpoints.hub import hub_cache_dir, hub_offline

    if not hub_offline():
        return None
    import huggingface_hub

    try:  # the cache as the environment says now (huggingface_hub reads HF_HUB_CACHE once, at its import)
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision,
                                                      cache_dir=str(hub_cache_dir()), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - the hub's not-cached errors vary by version
        raise DataError(f"dataset {repo!r} is not in the hub cache and HF_HUB_OFFLINE is set; fetch it once "
                        "online or give a local directory as data.path") from e


def split_files(root: Path, split: str) -> list[Path]:
    """The files of ``split`` under a local dataset directory (sorted), by the hub's naming conventions."""
    found: list[Path] = []
    for ext in ("parquet", "jsonl", "json"):
        for pattern in (f"**/{split}-*.{ext}", f"**/{split}.{ext}", f"**/{split}/*.{ext}"):
            found += [p for p in root.glob(pattern) if p.is_file()]
    return sorted(set(found))


def _file_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _skip(rows: Iterator[dict[str, Any]], n: int) -> Iterator[dict[str, Any]]:
    for _ in range(n):
        if next(rows, None) is None:
            break
    return rows


class RowOpener:
    """Opens split ``i`` at row ``offset``: local files, a cached hub snapshot, or a ``datasets`` stream."""

    def __init__(self, path: str, splits: Sequence[str]):
        from dultra_jax.checkpoints.hub import parse_hub_id

        self.splits = tuple(splits)
        local = Path(path).expanduser()
        self.stream: tuple[str, str | None] | None = None
        if local.is_file():
            if len(self.splits) != 1:
                raise DataError(f"data.path {path!r} is one file: it holds one split, not {list(self.splits)}")
            self.files = [[local]]
            return
        if not local.is_dir():
            hub = parse_hub_id(path)
            if hub is None:
                raise DataError(f"data.path {path!r} is neither a local file or directory nor a hub id org/name")
            snap = _hub_snapshot(*hub)
            if snap is None:
                self.stream = hub
                return
            local = snap
        self.files = [split_files(local, s) for s in self.splits]
        for s, files in zip(self.splits, self.files, strict=True):
            if not files:
                raise DataError(f"no files of split {s!r} under {local} (looked for {s}-*.parquet|jsonl, "
                                f"{s}.parquet|jsonl, {s}/*); set data.splits to the splits it has")

    def open(self, i: int, offset: int) -> Iterator[dict[str, Any]]:
        if self.stream is not None:
            import datasets

            repo, revision = self.stream
            ds = datasets.load_dataset(repo, split=self.splits[i], streaming=True, revision=revision)
            return iter(ds.skip(offset) if offset else ds)
        rows = (r for f in self.files[i] for r in _file_rows(f))
        return _skip(rows, offset)


class ConversationStream(grain.IterDataset):
    """Raw rows of every split, one from each in turn, until one runs out; then again (next epoch)."""

    def __init__(self, opener: RowOpener):
        super().__init__()
        self.opener = opener

    def __iter__(self) -> _StreamIterator:
        return _StreamIterator(self.opener)


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, opener: RowOpener):
        super().__init__()
        self.opener = opener
        self._state = {"epoch": 0, "read": [0] * len(opener.splits), "turn": 0}
        self._rows: list[Iterator[dict[str, Any]]] | None = None

    def __next__(self) -> dict[str, Any]:
        if self._rows is None:
            self._rows = [self.opener.open(i, n) for i, n in enumerate(self._state["read"])]
        for _ in range(2):
            turn = self._state["turn"]
            row = next(self._rows[turn], None)
            if row is not None:
                self._state["read"][turn] += 1
                self._state["turn"] = (turn + 1) % len(self._rows)
                return row
            if self._state["read"][turn] == 0:
                break  # an empty split: nothing will ever come from it
            # one split ran out: the epoch ends (as interleave_datasets' first_exhausted), all start over
            self._state = {"epoch": self._state["epoch"] + 1, "read": [0] * len(self._rows), "turn": 0}
            self._rows = [self.opener.open(i, 0) for i in range(len(self._state["read"]))]
        raise DataError(f"split {self.opener.splits[self._state['turn']]!r} has no rows")

    def get_state(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._state))

    def set_state(self, state: dict[str, Any]) -> None:
        self._state = {"epoch": int(state["epoch"]), "read": [int(n) for n in state["read"]],
                       "turn": int(state["turn"])}
        self._rows = None  # re-opened at the saved offsets on the next draw


def sequence_batches(source: str, path: str | None, splits: Sequence[str] | None, tokenizer, *, batch_size: int,
                     max_length: int, pad_id: int, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Batches of ``{"input_ids": [b, max_length], "prompt_length": [b], "row": [b]}`` where b is this process's
    contiguous share of ``batch_size`` rows (``row`` = the rows' positions in the global batch)."""
    spec = source_spec(source)
    path = path or spec.default_path
    if path is None:
        raise DataError(f"data source {source!r} needs data.path (a JSONL file, a directory or a hub id)")
    if batch_size % shard_count:
        raise DataError(f"batch size {batch_size} must be a multiple of the number of processes ({shard_count})")
    share = batch_size // shard_count
    mine = slice(shard_index * share, (shard_index + 1) * share)

    def encode(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        encoded = [encode_conversation(tokenizer, spec.messages(r), max_length, pad_id) for r in rows[mine]]
        return {"input_ids": np.stack([e[0] for e in encoded]),
                "prompt_length": np.asarray([e[1] for e in encoded], np.int32),
                "row": np.arange(mine.start, mine.stop, dtype=np.int32)}

    stream = ConversationStream(RowOpener(path, splits or spec.default_splits))
    return stream.batch(batch_size, drop_remainder=True, batch_fn=list).map(encode)
