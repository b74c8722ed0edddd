"""lm-evaluation-harness in process: the ``dultra`` model (docs/lm-eval.md).

Importing this module registers ``dultra`` with lm-eval (``lm_eval`` has no plugin discovery), so run it as
``dultra lm-eval ...`` or ``python -m dultra_jax.lm_eval_model ...`` (lm-eval's own CLI with the registration
imported), or ``import dultra_jax.lm_eval_model`` before ``lm_eval.simple_evaluate(model="dultra", ...)``.

- ``generate_until``: continuous batching (:class:`dultra_jax.text.TextModel`, ``generate_many``) of all
  requests with the same settings; ``max_gen_toks`` rounded up to a multiple of ``block_length`` for decoding,
  the completion cut to ``max_gen_toks`` tokens, at end-of-text and at the first ``until`` string. Each
  request's text equals decoding its prompt alone with the row seed :func:`prompt_seed` of ``seed`` and its ids.
  NFE and TPF are printed after each call and kept in :attr:`DultraLM.stats` (and ``stats_path``).
- ``loglikelihood``: LLaDA's Monte Carlo estimate (:mod:`dultra_jax.eval.likelihood`) and its greedy flag.
- ``loglikelihood_rolling``: the same estimate summed over lm-eval's disjoint rolling windows.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it only registers them into an empty registry)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dultra_jax.accounting import tpf
from dultra_jax.config import ConfigError
from dultra_jax.eval.likelihood import LikelihoodSettings, loglikelihood
from dultra_jax.text import TextModel

DECODE_KEYS = ("strategy", "reveal", "gen_length", "block_length", "temperature", "threshold", "factor", "steps",
               "cache", "planner_temperature", "factor_rule")
# lm-eval's own generation kwargs we read; other keys of a task's generation_kwargs must be DECODE_KEYS
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")
IGNORED_GEN_KWARGS = ("top_p", "top_k", "num_beams", "repetition_penalty")  # sampling knobs of AR models
_RUN = {"stats_path": None}  # set by ``dultra lm-eval --output_path``: where a model without stats_path writes


@dataclass
class DecodeStats:
    """Running totals of what ``generate_until`` decoded (NFE per request; TPF = mean effective tokens / mean
    NFE, dultra_jax.accounting) and what ``loglikelihood`` cost."""

    generate_requests: int = 0
    nfe_total: int = 0
    effective_tokens_total: int = 0
    generate_wall_s: float = 0.0
    loglikelihood_requests: int = 0
    mc_rows: int = 0
    loglikelihood_forwards: int = 0
    loglikelihood_wall_s: float = 0.0
    truncated_contexts: int = 0

    @property
    def mean_nfe(self) -> float:
        return self.nfe_total / self.generate_requests if self.generate_requests else 0.0

    @property
    def tpf(self) -> float:
        return tpf([self.effective_tokens_total], [self.nfe_total])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_nfe": self.mean_nfe, "tpf": self.tpf}


@register_model("dultra")
class DultraLM(TemplateLM):
    """A dUltra / LLaDA checkpoint as an lm-eval model. ``model_args`` are this constructor's keywords
    (``pretrained`` or ``path``: checkpoint directory or hub id; decoding defaults; ``mc_num``/``mc_batch``/
    ``cfg``/``greedy`` of the likelihood; ``stats_path`` a JSON file for the NFE/TPF totals)."""

    last: DultraLM | None = None  # the latest instance (``dultra lm-eval`` prints its totals at the end)

    def __init__(self, pretrained: str | None = None, path: str | None = None, dtype: str = "bf16", slots: int = 8,
                 strategy: str = "planner", reveal: str = "bernoulli", gen_length: int = 256,
                 block_length: int = 32, temperature: float = 0.0, threshold: float = 0.9, factor: float = 1.0,
                 steps: int | None = None, cache: str = "none", planner_temperature: float | None = None,
                 factor_rule: str = "original", seed: int = 0, mc_num: int = 128, mc_batch: int = 32,
                 cfg: float = 0.0, greedy: bool = True, max_length: int | None = None,
                 stats_path: str | None = None, overwrite_stats: bool = False, batch_size: Any = None,
                 max_batch_size: Any = None, device: Any = None, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"dultra model_args: unknown {sorted(unknown)}; see docs/lm-eval.md for the accepted "
                              "arguments")
        ref = pretrained if pretrained is not None else path
        if ref is None:
            raise ConfigError("dultra model_args need pretrained=PATH_OR_HUB_ID (a checkpoint with tokenizer files)")
        self.decode = dict(strategy=strategy, reveal=reveal, gen_length=gen_length, block_length=block_length,
                           temperature=float(temperature), threshold=float(threshold), factor=float(factor),
                           steps=steps, cache=cache, planner_temperature=planner_temperature,
                           factor_rule=factor_rule)
        self.mc = LikelihoodSettings(mc_num=mc_num, mc_batch=mc_batch, cfg=float(cfg), seed=seed,
                                     greedy=bool(greedy))
        self.slots, self.seed = slots, int(seed)
        stats_path = stats_path if stats_path is not None else _RUN["stats_path"]
        self.stats_path = None if stats_path is None else Path(stats_path)
        if self.stats_path is not None and self.stats_path.exists() and not overwrite_stats:
            raise ConfigError(f"stats_path {self.stats_path} exists: choose another or pass overwrite_stats=true")
        from dultra_jax.decoding.loop import DecodeConfig

        try:
            DecodeConfig(**self.decode)  # validate once, before loading the model
            self.text = TextModel.load(ref, dtype=dtype, slots=slots, seed=self.seed, **self.decode)
        except ValueError as e:
            raise ConfigError(f"dultra model_args: {e}") from e
        self.model, self.tokenizer = self.text.model, self.text.tokenizer
        limit = int(self.model.cfg.max_sequence_length)
        self.max_length = limit if max_length is None else min(int(max_length), limit)
        self.stats = DecodeStats()
        DultraLM.last = self

    # ---------------------------------------------------------------------------------------- tokenizer
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None
                   else self.model.cfg.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's default special tokens, except for a text that already starts with BOS (a chat
        template's output), which gets none added."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        if add_special_tokens is None:
            return self.text.encode(string)
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dultra")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------------------------------- likelihood
    def _truncate(self, context: list[int], keep: int) -> list[int]:
        """Left-truncate a context to ``keep`` tokens (at least one)."""
        if len(context) <= keep:
            return context
        if keep < 1:
            raise ConfigError(f"{self.max_length - keep} tokens to score or generate leave no room for a context "
                              f"within max_length {self.max_length}: lower max_gen_toks / gen_length")
        self.stats.truncated_contexts += 1
        return context[-keep:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(self._truncate(list(ctx), self.max_length - len(cont)), list(cont)) for _, ctx, cont in requests]
        res = loglikelihood(self.model, pairs, self.mc)
        st = self.stats
        st.loglikelihood_requests += len(pairs)
        st.mc_rows += res.mc_rows
        st.loglikelihood_forwards += res.forwards
        st.loglikelihood_wall_s += res.wall_s
        print(f"dultra loglikelihood: {len(pairs)} requests, mc_num {self.mc.mc_num}, {res.forwards} batch "
              f"forwards of {self.mc.mc_batch} rows, {res.wall_s:.1f}s", file=sys.stderr)
        self._write_stats()
        out = [(float(lp), bool(g)) for lp, g in zip(res.logprob, res.greedy, strict=True)]
        for (key, _, _), o in zip(requests, out, strict=True):
            if key is not None:  # rolling windows are cached as their whole string instead
                self.cache_hook.add_partial("loglikelihood", key, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of the estimate over lm-eval's disjoint windows: the first scores up to ``max_length - 1``
        tokens after the prefix token, each later one about ``max_length / 2`` new tokens given the
        ``max_length // 2`` tokens before them (an estimate of a lower bound: perplexities are upper bounds)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length - 1,
                    context_len=self.max_length // 2)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out = np.zeros(len(requests), np.float64)
        np.add.at(out, np.asarray(owner, np.int64), [s for s, _ in scores])
        for req, v in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(v))
        return [float(v) for v in out]

    # ---------------------------------------------------------------------------------------- generation
    def _settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decoding settings of one request: the model args, lm-eval's ``max_gen_toks`` / ``temperature`` /
        ``do_sample`` and any decoding key (``strategy``, ``threshold``, ...) from the task's gen_kwargs."""
        bad = sorted(set(gen_kwargs) - set(GEN_KWARGS) - set(DECODE_KEYS) - set(IGNORED_GEN_KWARGS))
        if bad:
            raise ConfigError(f"dultra: unsupported generation kwargs {bad}; accepted: "
                              f"{sorted(GEN_KWARGS + DECODE_KEYS)}")
        s = dict(self.decode)
        s.update({k: gen_kwargs[k] for k in DECODE_KEYS if k in gen_kwargs})
        if gen_kwargs.get("do_sample") is False:
            s["temperature"] = 0.0
        elif "temperature" in gen_kwargs:
            s["temperature"] = float(gen_kwargs["temperature"])
        if gen_kwargs.get("max_gen_toks") is not None:
            bl = int(s["block_length"])
            g = -(-int(gen_kwargs["max_gen_toks"]) // bl) * bl
            if s["strategy"] == "fixed" and s["steps"] is not None:  # keep the steps per block
                s["steps"] = int(s["steps"]) // (int(self.decode["gen_length"]) // bl) * (g // bl)
            s["gen_length"] = g
        return s

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, (_, gen_kwargs) in enumerate(args):
            s = self._settings(dict(gen_kwargs))
            settings.append(s)
            groups.setdefault(tuple(sorted(s.items())), []).append(i)
        out: list[str | None] = [None] * len(args)
        for idx in groups.values():
            s = settings[idx[0]]
            keep = self.max_length - int(s["gen_length"])
            prompts = [self._truncate(self.tok_encode(args[i][0]), keep) for i in idx]
            t0 = time.perf_counter()
            try:
                done = self.text.complete(prompts, seeds=[prompt_seed(p, self.seed) for p in prompts], **s)
            except ValueError as e:
                raise ConfigError(f"dultra generate_until: {e}") from e
            self.stats.generate_wall_s += time.perf_counter() - t0
            for i, c in zip(idx, done, strict=True):
                gk = dict(args[i][1])
                limit = gk.get("max_gen_toks")
                ids = c.token_ids if limit is None else c.token_ids[:int(limit)]
                text = cut_at(self.text.decode(ids), gk.get("until"))
                out[i] = text
                self.cache_hook.add_partial("generate_until", (args[i][0], gk), text)
                self.stats.generate_requests += 1
                self.stats.nfe_total += c.nfe
                self.stats.effective_tokens_total += round(c.tokens_per_forward * c.nfe)
        st = self.stats
        print(f"dultra generate_until: {len(args)} requests, mean NFE {st.mean_nfe:.2f}, TPF {st.tpf:.2f} "
              f"(totals so far), {st.generate_wall_s:.1f}s", file=sys.stderr)
        self._write_stats()
        return out

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        from dultra_jax.atomic import write_atomic

        body = {"stats": self.stats.to_dict(), "decode": self.decode, "likelihood": asdict(self.mc),
                "slots": self.slots, "seed": self.seed, "max_length": self.max_length}
        write_atomic(self.stats_path, json.dumps(body, indent=2))


def prompt_seed(ids, seed: int = 0) -> int:
    """A request's row seed: keyed by ``seed`` and its prompt ids, so its answer does not depend on the other
    requests, their order or the number of slots."""
    return zlib.crc32(np.asarray([seed, *ids], np.int64).tobytes()) & 0x7FFFFFFF


def cut_at(text: str, until) -> str:
    """``text`` up to the earliest occurrence of any stop string (``until``: a string, a list or None)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with ``dultra`` registered (``dultra lm-eval ...``, ``python -m dultra_jax.lm_eval_model
    ...``). With ``--output_path`` the NFE/TPF totals go to ``dultra_stats_<UTC time>.json`` in that directory
    unless ``stats_path`` is among the model args."""
    import argparse
    from datetime import datetime

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--output_path", "-o", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.output_path:
        out = Path(known.output_path)
        out = out.parent if out.suffix == ".json" else out
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")
        _RUN["stats_path"] = str(out / f"dultra_stats_{stamp}.json")
    setup_logging()
    parser = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv (it inserts the legacy ``run`` itself)
    try:
        args = parser.parse_args()
        parser.execute(args)
    finally:
        sys.argv = saved
        _RUN["stats_path"] = None
    lm = DultraLM.last
    if lm is not None:
        st = lm.stats
        print(f"dultra: {st.generate_requests} generated (mean NFE {st.mean_nfe:.2f}, TPF {st.tpf:.2f}), "
              f"{st.loglikelihood_requests} likelihood requests ({st.mc_rows} Monte Carlo rows)"
              + (f"; wrote {lm.stats_path}" if lm.stats_path is not None and lm.stats_path.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
