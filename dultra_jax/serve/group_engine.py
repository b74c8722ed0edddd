"""A stand-in for ``dultra_jax.decoding.engine.DecodeEngine`` (same contract) until that engine is merged.

Each :meth:`GroupEngine.step` decodes up to ``slots`` queued prompts to the end with
:func:`dultra_jax.decoding.generate_many`, so results equal ``generate([prompt], row_seeds=[seed])`` like the
engine's; only progress is coarser (``committed`` is None until a prompt is done, cancelling a running prompt
takes effect when its group ends). Delete once the engine lands: :mod:`dultra_jax.serve.worker` imports it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dultra_jax.decoding.loop import DecodeConfig, check_prompts


@dataclass(frozen=True)
class Finished:
    handle: int
    tokens: np.ndarray  # [len(prompt) + gen_length] int32: the prompt's ids, then the generated ids
    nfe: int
    iterations: int
    cancelled: bool = False


class GroupEngine:
    def __init__(self, model, cfg: DecodeConfig, *, slots: int, plan=None):
        if plan is not None:
            raise ValueError("the stand-in engine decodes on one device; --mesh needs dultra_jax.decoding.engine")
        self.model, self.cfg, self._n = model, cfg, slots
        self._queue: deque[tuple[int, np.ndarray, int]] = deque()
        self._running: set[int] = set()
        self._cancelled: set[int] = set()
        self._finished: list[Finished] = []
        self._next = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return len(self._running)

    @property
    def slots(self) -> int:
        return self._n

    def submit(self, prompt_ids: Sequence[int], *, seed: int | None = None) -> int:
        prompt = np.asarray(prompt_ids, np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError("submit got an empty prompt: every prompt needs at least one token")
        check_prompts(prompt[None], self.model.cfg, self.cfg.gen_length)
        h, self._next = self._next, self._next + 1
        self._queue.append((h, prompt.astype(np.int32), h if seed is None else int(seed)))
        return h

    def cancel(self, handle: int) -> None:
        for item in self._queue:
            if item[0] == handle:
                self._queue.remove(item)
                self._finished.append(Finished(handle, item[1], 0, 0, cancelled=True))
                return
        if handle in self._running:
            self._cancelled.add(handle)

    def harvest(self) -> list[Finished]:
        out, self._finished = self._finished, []
        return out

    def committed(self, handle: int) -> np.ndarray | None:
        return None

    def step(self) -> bool:
        from dultra_jax.decoding import generate_many
        from dultra_jax.text import generate_kwargs

        group = [self._queue.popleft() for _ in range(min(self._n, len(self._queue)))]
        if not group:
            return False
        self._running = {h for h, _, _ in group}
        full = group + [group[-1]] * (self._n - len(group))  # always `slots` rows: one compiled shape per width
        try:
            res = generate_many(self.model, [p for _, p, _ in full], slots=self._n,
                                row_seeds=[s for _, _, s in full], **generate_kwargs(self.cfg))
        finally:
            self._running = set()
        for i, (h, _, _) in enumerate(group):
            self._finished.append(Finished(h, res.tokens[i], int(res.nfe[i]), int(res.iterations),
                                           cancelled=h in self._cancelled))
        self._cancelled.clear()
        return True
