"""Worker processes with a per-task wall-clock bound, and math-verify run through them.

math-verify times itself out with SIGALRM, which only works on a main thread and clashes with other alarm
users, and sympy can hang on pathological input. So verification runs in long-lived worker processes (each on
its own main thread, where math-verify's own timeouts work), and the host adds its own bound: a task that
overruns has its worker killed and replaced, and scores as a failure. A training step never waits longer than
``timeout_s`` per answer and never crashes on one.

Workers load a module *file* standalone (:mod:`dultra_jax.rewards._procpool_worker`), so they never import the
package and JAX: start-up is the cost of importing math-verify (about half a second).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dultra_jax.rewards import math as math_rewards

WORKER = Path(__file__).with_name("_procpool_worker.py")


@dataclass
class TaskResult:
    ok: bool
    result: Any = None
    error: str | None = None
    timed_out: bool = False


class _Worker:
    def __init__(self, python: str, module_file: Path):
        self.proc = subprocess.Popen(
            [python, "-I", str(WORKER), str(module_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.buf = b""
        self.task: int | None = None
        self.deadline = 0.0

    def send(self, task_id: int, fn: str, kwargs: dict[str, Any], timeout_s: float) -> None:
        self.task = task_id
        self.deadline = time.monotonic() + timeout_s
        self.proc.stdin.write((json.dumps({"id": task_id, "fn": fn, "kwargs": kwargs}) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


class WorkerPool:
    """``workers`` processes running functions of ``module_file``; at most ``timeout_s`` per task."""

    def __init__(self, module_file: str | Path, *, workers: int | None = None, timeout_s: float = 10.0,
                 python: str | None = None):
        self.module_file = Path(module_file)
        if not self.module_file.is_file():
            raise FileNotFoundError(f"worker module not found: {self.module_file}")
        self.n = max(1, int(workers or min(4, os.cpu_count() or 1)))
        self.timeout_s = float(timeout_s)
        self.python = python or sys.executable
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers = []

    def map(self, fn: str, kwargs_list: Sequence[dict[str, Any]]) -> list[TaskResult]:
        """Run ``fn(**kwargs)`` for each entry; results in order. Thread-safe (one map at a time)."""
        with self._lock:
            return self._map(fn, list(kwargs_list))

    def _spawn(self) -> _Worker:
        return _Worker(self.python, self.module_file)

    def _map(self, fn: str, tasks: list[dict[str, Any]]) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while len(self._workers) < min(self.n, max(1, len(tasks))):
            self._workers.append(self._spawn())
        busy: dict[int, _Worker] = {}
        sel = selectors.DefaultSelector()
        try:
            while pending or busy:
                for i, w in enumerate(self._workers):
                    if not pending:
                        break
                    if w.task is None:
                        if w.proc.poll() is not None:  # died between tasks: replace
                            w.kill()
                            w = self._workers[i] = self._spawn()
                        tid = pending.popleft()
                        try:
                            w.send(tid, fn, tasks[tid], self.timeout_s)
                        except (BrokenPipeError, OSError):
                            pending.appendleft(tid)
                            w.kill()
                            self._workers[i] = self._spawn()
                            continue
                        busy[w.proc.stdout.fileno()] = w
                        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
                now = time.monotonic()
                wait = max(0.0, min(w.deadline for w in busy.values()) - now) if busy else 0.0
                for key, _ in sel.select(timeout=wait):
                    w = key.data
                    chunk = os.read(w.proc.stdout.fileno(), 1 << 16)
                    if not chunk:  # worker died mid-task
                        self._finish(w, busy, sel, results, TaskResult(ok=False, error="worker process died"),
                                     replace=True)
                        continue
                    w.buf += chunk
                    while b"\n" in w.buf and w.task is not None:
                        line, w.buf = w.buf.split(b"\n", 1)
                        reply = json.loads(line)
                        if reply.get("id") != w.task:
                            continue
                        res = TaskResult(ok=bool(reply["ok"]), result=reply.get("result"), error=reply.get("error"))
                        self._finish(w, busy, sel, results, res, replace=False)
                now = time.monotonic()
                for w in [w for w in busy.values() if now >= w.deadline]:
                    self._finish(w, busy, sel, results, TaskResult(
                        ok=False, timed_out=True, error=f"timed out after {self.timeout_s:.1f}s"), replace=True)
        finally:
            sel.close()
        return results  # type: ignore[return-value]

    def _finish(self, w: _Worker, busy, sel, results, res: TaskResult, *, replace: bool) -> None:
        results[w.task] = res
        sel.unregister(w.proc.stdout)
        busy.pop(w.proc.stdout.fileno(), None)
        w.task = None
        if replace:
            i = self._workers.index(w)
            w.kill()
            self._workers[i] = self._spawn()


class MathVerifier:
    """Math correctness for batches: extraction in-process, equivalence in time-bounded worker processes.

    ``mode``: ``"eval"`` (default) or ``"faithful"`` (see :mod:`dultra_jax.rewards.math`). An answer whose
    check times out or fails scores as incorrect.
    """

    def __init__(self, *, workers: int | None = None, timeout_s: float = 10.0, mode: str = "eval"):
        if mode not in ("eval", "faithful"):
            raise ValueError(f"unknown math verification mode {mode!r}; use 'eval' or 'faithful'")
        self.mode = mode
        # math-verify's own (whole-second) bound per parse/verify; the pool's bound backs it up.
        self._inner_timeout = max(1, int(timeout_s) // 3)
        self.pool = WorkerPool(math_rewards.__file__, workers=workers, timeout_s=timeout_s)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, completions: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
        """Per completion: {"correct", "extracted", "reference", "error"}."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        refs = [math_rewards.extract_boxed_answer(str(a)) for a in answers]
        cands = [math_rewards.extract_boxed_answer(str(c)) for c in completions]
        out = self.pool.map("answers_equal", [
            {"reference": r, "candidate": c, "mode": self.mode, "timeout_s": self._inner_timeout}
            for r, c in zip(refs, cands, strict=True)])
        return [
            {"correct": bool(t.ok and t.result), "extracted": c, "reference": r, "error": t.error}
            for r, c, t in zip(refs, cands, out, strict=True)
        ]

    def rewards(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        """The original's correctness reward: 2.0 if equivalent, else 0.0."""
        return [math_rewards.CORRECT_REWARD if c["correct"] else 0.0 for c in self.check(completions, answers)]
