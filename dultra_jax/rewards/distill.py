"""Distillation reward: mean per-token log-probability of a completion under an autoregressive teacher.

As the original's ``verifier_reward`` (docs/original.md §7): the conversation (system + user turns) and
the completion as an assistant turn are rendered with the *teacher's* chat template; the completion string is
the rendered text after the rendered prompt (so it includes the template's end-of-turn suffix); the reward is
(1/n) * sum of log p_teacher over the last n tokens of ``tokenize(prompt + completion)``, where
n = ``len(tokenize(completion))`` (the boundary may not align with the joint tokenisation: original quirk).
Optionally the student's per-token log-probabilities (last n) are subtracted first, as the original does with
``student_logprob``. Values are <= 0.

Unlike the original (batch 1 in PyTorch), rows are right-padded into a batch whose length is rounded up to a
bucket, and scored by one jitted function; each row equals its unpadded result. A teacher placed on a mesh that
spans several processes scores collectively: every process calls :meth:`TeacherScorer.token_logprobs` at the same
time (with however many rows it holds, none included), the rows become one global batch split over the mesh, and
each process reads its own rows back (docs/training-data.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


def render_prompt_completion(tokenizer, prompt: Messages, completion: str) -> tuple[str, str]:
    """(prompt text, completion text) as TRL's ``maybe_apply_chat_template`` splits them."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt_text):
        log.warning("teacher chat template: prompt+completion does not start with the prompt; slicing anyway")
    return prompt_text, full[len(prompt_text):]


class TeacherScorer:
    """Scores completions with a :class:`~dultra_jax.teacher.Qwen2ForCausalLM` and its tokenizer."""

    def __init__(self, model, tokenizer, *, bucket: int = 64, chunk: int = 128, max_length: int | None = None,
                 plan=None):
        import jax
        from flax import nnx

        self.model = model
        self.plan = plan
        self.tokenizer = tokenizer
        self.bucket = int(bucket)
        self.chunk = int(chunk)
        self.max_length = int(max_length or model.cfg.max_position_embeddings)
        self.graphdef, self.state = nnx.split(model)
        # parameters spread over several processes: every call is a collective of all processes
        self.collective = any(not a.is_fully_addressable for a in jax.tree.leaves(self.state))
        if self.collective and plan is None:
            raise ValueError("a teacher spread over several processes needs the plan it was placed with (plan=)")
        if self.collective and plan.batch_shards % jax.process_count():
            raise ValueError(f"a teacher on {jax.process_count()} processes needs the mesh's batch axes (data x fsdp "
                             f"= {plan.batch_shards}) to split over every process; use a multiple of the process count")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str = "bf16", plan=None, **kwargs) -> TeacherScorer:
        """A local checkpoint directory or a hub repo id with ``config.json``, safetensors and a tokenizer;
        with ``plan`` (a :class:`dultra_jax.parallel.ShardingPlan`) the teacher is placed on its mesh by the
        plan's rules (``shard_teacher``), as the trainer's own model is."""
        from transformers import AutoTokenizer

        from dultra_jax.teacher import load_qwen2, resolve_teacher_path, shard_teacher

        path = resolve_teacher_path(name_or_path)
        model = load_qwen2(path, dtype=dtype)
        if plan is not None:
            model = shard_teacher(model, plan)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), plan=plan, **kwargs)

    def encode(self, prompt: Messages, completion: str) -> tuple[list[int], int]:
        """(token ids of prompt + completion, n = number of completion tokens scored)."""
        prompt_text, completion_text = render_prompt_completion(self.tokenizer, prompt, completion)
        n = len(self.tokenizer(completion_text)["input_ids"])
        ids = self.tokenizer(prompt_text + completion_text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_length:
            ids = ids[-self.max_length:]
        return list(ids), n

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per row: float32 [len-1], entry t = log p(ids[t+1] | ids[:t+1]). One padded, jitted batch; with a
        teacher spread over processes, a collective call (every process, each with its own rows, maybe none)."""
        import jax
        import jax.numpy as jnp

        from dultra_jax.teacher import next_token_logprobs

        longest = max((len(r) for r in rows), default=0)
        count = len(rows)
        if self.collective:  # one global batch: the most rows and the longest row of any process
            from dultra_jax.parallel import gather_rows

            agreed = gather_rows(np.asarray([[count, longest]], np.int64)).max(axis=0)
            per_process = self.plan.batch_shards // jax.process_count()  # rows of each process: whole shards
            count = -(-int(agreed[0]) // per_process) * per_process
            longest = int(agreed[1])
        if count == 0:
            return []
        length = max(2, -(-longest // self.bucket) * self.bucket)
        ids = np.zeros((count, length), np.int32)
        mask = np.zeros((count, length), np.int32)
        mask[:, 0] = 1  # filler rows (collective calls) attend to one token: finite, and never read
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        if self.collective:
            from dultra_jax.parallel import local_rows

            out = next_token_logprobs(self.graphdef, self.state, self.plan.shard_batch(ids),
                                      self.plan.shard_batch(mask), chunk=self.chunk)
            lp = local_rows(out)
        else:
            lp = np.asarray(next_token_logprobs(self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(mask),
                                                chunk=self.chunk))
        return [lp[i, : max(0, len(r) - 1)] for i, r in enumerate(rows)]

    def rewards(
        self,
        prompts: Sequence[Messages],
        completions: Sequence[str],
        student_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> list[float]:
        """Mean teacher log-prob of each completion (minus the student's, per token, when given)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        encoded = [self.encode(list(p), c) for p, c in zip(prompts, completions, strict=True)]
        per_row = self.token_logprobs([ids for ids, _ in encoded])
        out = []
        for i, ((_, n), lp) in enumerate(zip(encoded, per_row, strict=True)):
            n_eff = min(n, len(lp))
            scored = lp[len(lp) - n_eff:].astype(np.float64)
            if student_logprobs is not None:
                student = np.asarray(student_logprobs[i], np.float64)
                if student.shape[0] < n_eff:
                    raise ValueError(
                        f"completion {i}: student_logprobs has {student.shape[0]} entries but {n_eff} teacher "
                        "tokens are scored; pass per-token student log-probs covering the completion")
                scored = scored - student[student.shape[0] - n_eff:]
            out.append(float(scored.sum() / max(n, 1)))
        return out


_TEACHERS: dict[tuple[str, str], TeacherScorer] = {}


def cached_teacher(name_or_path: str, *, dtype: str = "bf16", **kwargs: Any) -> TeacherScorer:
    """One loaded teacher per (name, dtype) per process, as the original caches its teachers."""
    key = (str(name_or_path), dtype)
    if key not in _TEACHERS:
        _TEACHERS[key] = TeacherScorer.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    return _TEACHERS[key]
