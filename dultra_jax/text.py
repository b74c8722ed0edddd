"""Text in, text out: a model with its tokenizer and decoding defaults, so callers never tokenise on their own.

    tm = TextModel.load("sengi/dUltra-math", dtype="bf16", gen_length=256, block_length=32)
    [c] = tm.complete([[{"role": "user", "content": "What is 12*7?"}]])
    c.text, c.nfe, c.tokens_per_forward

``complete`` decodes every prompt through continuous batching (:func:`dultra_jax.decoding.generate_many`);
prompt i with seed s returns exactly ``generate(model, [ids_i], row_seeds=[s], **settings)``, whatever else is
in the call. The server (:mod:`dultra_jax.serve`), ``dultra generate``, the lm-eval model and the evaluation
harness (:mod:`dultra_jax.eval`) share this object (its :class:`TextCodec`), so prompts are encoded, answers
cut and NFE/TPF counted the same way everywhere (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dultra_jax import accounting
from dultra_jax.decoding.loop import DecodeConfig

Messages = Sequence[Mapping[str, str]]
Prompt = str | Sequence[int] | Messages

# DecodeConfig fields a caller may set (the rest are set by whoever runs the loop)
_NOT_OPTIONS = ("return_trajectory", "schedule", "on_block")
DECODE_OPTIONS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.name not in _NOT_OPTIONS)
DEFAULTS = dict(gen_length=256, block_length=32, strategy="planner")


@dataclass(frozen=True)
class Completion:
    """One decoded answer. ``token_ids``: the generated ids the answer keeps (up to end-of-text or the stop
    string); ``nfe``: forwards its row was decoding in; ``tokens_per_forward``: effective tokens / NFE."""

    text: str
    token_ids: list[int]
    nfe: int
    tokens_per_forward: float
    finish_reason: str  # "stop" (end-of-text or a stop string) | "length" (gen_length reached)


class TextCodec:
    """Text <-> ids with one tokenizer, the only place prompts are rendered and answers turned back into text.

    Split from :class:`TextModel` so code that has a tokenizer but no model (benchmarks reading prompts, the
    harness's helpers) encodes exactly as the server and the harness do. Texts are tokenised with the tokenizer's
    default special tokens (LLaDA's: BOS first), as the original's evaluation does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known = np.unique(np.fromiter(tokenizer.get_vocab().values(), np.int64))  # ids that carry text

    def render(self, messages: Messages) -> str:
        """The chat-templated prompt text of ``messages`` (the tokenizer's template, generation prompt added)."""
        from dultra_jax.data.prompts import render_chat

        return render_chat(self.tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])

    def encode_text(self, text: str, *, add_special_tokens: bool | None = None) -> list[int]:
        """Ids of ``text`` (the tokenizer's default special tokens unless ``add_special_tokens`` says)."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer(text, **kw)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (ids the tokenizer does not know carry no text)."""
        arr = np.asarray(list(ids), np.int64)
        return self.tokenizer.decode(arr[np.isin(arr, self.known)].tolist(), skip_special_tokens=True)


def decode_settings(defaults: DecodeConfig, **overrides: Any) -> DecodeConfig:
    """``defaults`` with ``overrides`` (DecodeConfig fields; validated there); unknown names are one clear error."""
    bad = sorted(set(overrides) - set(DECODE_OPTIONS))
    if bad:
        raise ValueError(f"unknown decoding option(s) {bad}; choose from {list(DECODE_OPTIONS)}")
    cfg = dataclasses.replace(defaults, **overrides)
    return cfg


def generate_kwargs(cfg: DecodeConfig) -> dict[str, Any]:
    """The keyword arguments of ``generate``/``generate_many`` that reproduce ``cfg``."""
    return {name: getattr(cfg, name) for name in DECODE_OPTIONS}


class TextModel:
    """Model + tokenizer + decoding defaults (a :class:`DecodeConfig`); ``slots`` rows decode at once."""

    def __init__(self, model, tokenizer, *, slots: int = 8, seed: int = 0, **decode_defaults: Any):
        if not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self.model, self.tokenizer, self.slots, self.seed = model, tokenizer, slots, int(seed)
        opts = {**DEFAULTS, **decode_defaults}
        bad = sorted(set(opts) - set(DECODE_OPTIONS))
        if bad:
            raise ValueError(f"unknown decoding option(s) {bad}; choose from {list(DECODE_OPTIONS)}")
        self.defaults = DecodeConfig(**opts)
        cfg = model.cfg
        self.mask_id = cfg.mask_token_id
        self.excluded = accounting.model_excluded_ids(cfg, tokenizer)  # not effective tokens
        self.end_ids = np.asarray([i for i in self.excluded if i != self.mask_id], np.int64)  # end-of-text ids
        self.codec = TextCodec(tokenizer)

    @classmethod
    def load(cls, path_or_hub_id: str | Path, *, dtype: str = "bf16", tokenizer: str | Path | Any = None,
             slots: int = 8, seed: int = 0, mesh=None, **decode_defaults: Any) -> TextModel:
        """Open a checkpoint (directory or hub id) with its own tokenizer, or ``tokenizer`` (a directory or a
        loaded tokenizer) when the checkpoint has none."""
        import dultra_jax
        from dultra_jax.checkpoints.hub import resolve_model_path
        from dultra_jax.checkpoints.tokenizer import load_tokenizer

        path = resolve_model_path(path_or_hub_id)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(path if tokenizer is None else tokenizer)
        model = dultra_jax.load(path, dtype=dtype, **({"mesh": mesh} if mesh is not None else {}))
        return cls(model, tokenizer, slots=slots, seed=seed, **decode_defaults)

    # ------------------------------------------------------------------------------------------- text <-> ids
    def encode(self, prompt: Prompt, *, chat: bool | None = None) -> list[int]:
        """Prompt ids of a text (``chat=True``: as one user turn), chat messages (the model's chat template) or
        token ids (checked, passed through)."""
        if isinstance(prompt, str):
            if chat:
                prompt = [{"role": "user", "content": prompt}]
            else:
                return self.codec.encode_text(prompt)
        seq = list(prompt)
        if not seq:
            raise ValueError("empty prompt: give a text, chat messages or at least one token id")
        if all(isinstance(m, Mapping) for m in seq):
            for m in seq:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError("each chat message needs a string 'role' and a string 'content'")
            return self.codec.encode_text(self.codec.render(seq))
        if chat:
            raise ValueError("chat=True needs a text or chat messages, not token ids")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in seq):
            raise ValueError("a prompt is a text, a list of chat messages ({'role', 'content'}) or a list of int "
                             "token ids")
        ids = [int(t) for t in seq]
        n = self.model.cfg.embedding_size
        if any(t < 0 or t >= n for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {n})")
        if self.mask_id in ids:
            raise ValueError(f"prompt token ids contain the MASK id {self.mask_id}")
        return ids

    def render(self, messages: Messages) -> str:
        """The chat-templated prompt text of ``messages`` (what :meth:`encode` tokenises)."""
        return self.codec.render(messages)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (ids the tokenizer does not know carry no text)."""
        return self.codec.decode(ids)

    # ------------------------------------------------------------------------------------------- answers
    def answer_ids(self, generated: Sequence[int]) -> tuple[list[int], bool]:
        """(the generated ids before the first end-of-text id, whether one was found)."""
        gen = np.asarray(list(generated), np.int64)
        hit = np.flatnonzero(np.isin(gen, self.end_ids))
        return (gen[: hit[0]].tolist(), True) if hit.size else (gen.tolist(), False)

    def finish(self, generated: Sequence[int], nfe: int, stop: Sequence[str] = ()) -> Completion:
        """The :class:`Completion` of a row's generated ids: cut at end-of-text, then at the first stop string."""
        ids, ended = self.answer_ids(generated)
        text = self.decode(ids)
        cut = cut_at_stop(text, stop)
        if cut is not None:
            text, ended = cut, True
            ids = ids[: self._ids_covering(ids, len(text))]
        eff = int(accounting.effective_tokens(np.asarray(generated)[None], self.excluded)[0])
        return Completion(text=text, token_ids=ids, nfe=int(nfe), tokens_per_forward=accounting.tpf([eff], [nfe]),
                          finish_reason="stop" if ended else "length")

    def partial_text(self, committed: Sequence[int], stop: Sequence[str] = ()) -> str:
        """Text of a committed left-to-right prefix that the final answer is sure to start with: cut at
        end-of-text and stop strings, minus a trailing incomplete character and the last ``len(stop) - 1``
        characters (a stop string may still complete there)."""
        ids, ended = self.answer_ids(committed)
        text = self.decode(ids)
        cut = cut_at_stop(text, stop)
        if cut is not None:
            return cut
        text = text.rstrip("\ufffd")
        hold = max((len(s) for s in stop), default=1) - 1
        return text[: len(text) - hold] if hold and not ended else text

    def _ids_covering(self, ids: list[int], n_chars: int) -> int:
        lo, hi = 0, len(ids)
        while lo < hi:  # the fewest ids whose text has >= n_chars characters
            mid = (lo + hi) // 2
            if len(self.decode(ids[:mid])) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ------------------------------------------------------------------------------------------- decoding
    def settings(self, **overrides: Any) -> DecodeConfig:
        """The defaults with ``overrides`` (validated)."""
        return decode_settings(self.defaults, **overrides)

    def complete(self, prompts: Sequence[Prompt], *, seeds: Sequence[int] | None = None, chat: bool | None = None,
                 stop: Sequence[str] = (), **decode_overrides: Any) -> list[Completion]:
        """Decode each prompt (text, chat messages or token ids) with the defaults and ``decode_overrides``;
        results in input order. ``seeds`` key each prompt's randomness (default: this object's ``seed`` for every
        prompt, so an answer does not depend on its position)."""
        from dultra_jax.decoding import generate_many

        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise ValueError("complete() takes a list of prompts (texts, chat message lists or token id lists)")
        if not prompts:
            return []
        cfg = self.settings(**decode_overrides)
        ids = [self.encode(p, chat=chat) for p in prompts]
        seeds = [self.seed] * len(ids) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(ids)} prompts")
        res = generate_many(self.model, ids, slots=self.slots, row_seeds=seeds, **generate_kwargs(cfg))
        return [self.finish(res.generated(i), int(res.nfe[i]), stop) for i in range(len(ids))]


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """``text`` up to the earliest occurrence of any stop string, or None when none occurs."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else None
