"""The one thread that owns the device: it feeds client prompts into decode engines and hands answers back.

The web layer never touches the model. It calls :meth:`Worker.submit` (non-blocking: an inbox, a bounded
count of waiting prompts -> :class:`QueueFull`) and receives :class:`Event` s through each job's ``deliver``
callback (thread-safe; the app passes ``loop.call_soon_threadsafe``). Jobs whose settings compile to the same
program (one :class:`DecodeConfig`) share one engine's slots; different settings get their own engine, and
the thread steps engines with work in turn, so no request is refused for its settings. Streaming jobs get the
text of their committed left-to-right prefix after every step (a diffusion model commits tokens out of order
inside a block, so only a prefix with no MASK before it is final).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dultra_jax.decoding.engine import DecodeEngine
from dultra_jax.decoding.loop import DecodeConfig
from dultra_jax.text import Completion, TextModel

log = logging.getLogger("dultra.serve")


class QueueFull(Exception):
    """More prompts are waiting than the server's ``max_queue`` (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits nothing new (HTTP 503)."""


@dataclass(frozen=True)
class Event:
    kind: str  # "delta" (text: new streamed text), "done" (completion), "error" (text: the message)
    index: int  # the prompt's index in its client request
    text: str = ""
    completion: Completion | None = None


@dataclass(eq=False)
class Job:
    """One prompt of a client request."""

    ids: list[int]
    seed: int
    cfg: DecodeConfig
    deliver: Callable[[Event], None]
    index: int = 0
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None  # cut the answer to this many generated ids (gen_length is rounded up to it)
    stream: bool = False
    handle: int | None = None
    sent: str = field(default="")  # streamed so far
    committed: int = 0  # generated ids of the committed prefix when ``sent`` was made


class Worker:
    """Owns the device. ``slots`` rows per engine; at most ``max_queue`` prompts waiting for a slot;
    at most ``max_engines`` distinct settings kept compiled (idle ones are dropped first)."""

    def __init__(self, text: TextModel, *, slots: int, max_queue: int, plan=None, max_engines: int = 8,
                 metrics=None):
        self.text, self.slots, self.max_queue, self.plan = text, slots, max_queue, plan
        self.max_engines, self.metrics = max_engines, metrics
        self.engine_name = f"{DecodeEngine.__module__}.{DecodeEngine.__name__}"
        self._engines: dict[DecodeConfig, DecodeEngine] = {}
        self._jobs: dict[tuple[DecodeConfig, int], Job] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # prompts submitted and not yet finished
        self._busy = 0  # prompts in slots after the last step
        self._admitting = True
        self._deadline: float | None = None  # set by drain(): cancel what is left after it
        self._thread = threading.Thread(target=self._run, name="dultra-serve-worker", daemon=True)

    # ------------------------------------------------------------------------------------------ web side
    @staticmethod
    def check(cfg: DecodeConfig) -> None:
        """ValueError when the engine cannot run ``cfg`` (it decodes every row on its own schedule)."""
        dataclasses.replace(cfg, schedule="per_row")

    @property
    def waiting(self) -> int:
        return max(0, self._outstanding - self._busy)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def admitting(self) -> bool:
        return self._admitting

    def start(self) -> Worker:
        self._thread.start()
        return self

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of a request's prompts, or none (QueueFull / Draining)."""
        with self._lock:
            if not self._admitting:
                raise Draining("the server is shutting down")
            if self.waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{self.waiting} prompts are waiting (max_queue {self.max_queue}); retry later")
            self._outstanding += len(jobs)
        self._inbox.put(("submit", list(jobs)))

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Drop prompts whose client went away; their slots free at the engine's next step."""
        self._inbox.put(("cancel", list(jobs)))

    def stop_admitting(self) -> None:
        with self._lock:
            self._admitting = False

    def drain(self, drain_s: float) -> None:
        """Stop admitting; prompts still in flight after ``drain_s`` seconds are cancelled (their clients get 503)
        and the thread ends once none is left."""
        self.stop_admitting()
        deadline = time.monotonic() + drain_s
        self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
        self._inbox.put(("wake", []))

    def stop(self, drain_s: float) -> None:
        """:meth:`drain`, then wait for the thread."""
        self.drain(drain_s)
        self._thread.join(drain_s + 30.0)

    # ------------------------------------------------------------------------------------------ device side
    def _run(self) -> None:
        turn = 0
        while True:
            active = [(c, e) for c, e in self._engines.items() if e.queued or e.busy]
            self._read_inbox(block=not active)
            for c, e in list(self._engines.items()):  # cancelled queued prompts leave without a step
                self._collect(c, e)
            if self._deadline is not None and (not self._jobs or time.monotonic() > self._deadline):
                self._cancel_all("the server shut down before this request finished")
                return
            active = [(c, e) for c, e in self._engines.items() if e.queued or e.busy]
            if not active:
                continue
            cfg, eng = active[turn % len(active)]
            turn += 1
            t0 = time.perf_counter()
            try:
                eng.step()
            except Exception as e:  # a failing program fails its own requests, not the server
                log.exception("decode step failed")
                self._fail_engine(cfg, f"decoding failed: {type(e).__name__}: {e}")
                continue
            self._after_step(cfg, eng, time.perf_counter() - t0)

    def _read_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, jobs = item
            if kind == "submit":
                for job in jobs:
                    self._admit(job)
            elif kind == "cancel":
                for job in jobs:
                    eng = self._engines.get(job.cfg)
                    if job.handle is not None and eng is not None and (job.cfg, job.handle) in self._jobs:
                        eng.cancel(job.handle)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, job: Job) -> None:
        eng = self._engines.get(job.cfg)
        if eng is None:
            if len(self._engines) >= self.max_engines:
                for c, e in list(self._engines.items()):
                    if not (e.queued or e.busy) and len(self._engines) >= self.max_engines:
                        del self._engines[c]
            try:
                # arrival order: a free slot takes a prompt that fits the batch's width (bounded), so one long
                # prompt does not make every row pay its width, as sorting by length spares generate_many
                eng = DecodeEngine(self.text.model, job.cfg, slots=self.slots, plan=self.plan, admission="width")
            except Exception as e:
                self._finish(job, Event("error", job.index, text=f"cannot decode with these settings: {e}"))
                return
            self._engines[job.cfg] = eng
        try:
            job.handle = eng.submit(job.ids, seed=job.seed)
        except ValueError as e:
            self._finish(job, Event("error", job.index, text=str(e)))
            return
        self._jobs[(job.cfg, job.handle)] = job

    def _after_step(self, cfg: DecodeConfig, eng, seconds: float) -> None:
        self._collect(cfg, eng, seconds)
        for h in eng.running():  # only rows in slots can have progressed (not every queued job)
            job = self._jobs.get((cfg, h))
            if job is not None and job.stream:
                ids = eng.committed(h)
                if ids is not None and len(ids) > job.committed:  # the prefix only grows: no growth, no new text
                    job.committed = len(ids)
                    self._stream(job, ids)
        self._busy = sum(e.busy for e in self._engines.values())

    def _collect(self, cfg: DecodeConfig, eng, seconds: float = 0.0) -> None:
        """Deliver what the engine has finished (or cancelled) since the last call."""
        for f in eng.harvest():
            job = self._jobs.pop((cfg, f.handle), None)
            if job is None:
                continue
            if f.cancelled:
                if self.metrics is not None:
                    self.metrics.cancelled.inc()
                self._finish(job, Event("error", job.index, text="cancelled"))
                continue
            gen = np.asarray(f.tokens)[len(job.ids):]
            c = self.text.finish(gen[: job.max_tokens], f.nfe, job.stop)
            if self.metrics is not None:
                self.metrics.completed(c, seconds)
            self._finish(job, Event("done", job.index, completion=c))

    def _stream(self, job: Job, committed: np.ndarray) -> None:
        text = self.text.partial_text(committed[: job.max_tokens], job.stop)
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.deliver(Event("delta", job.index, text=text[len(job.sent):]))
            job.sent = text

    def _finish(self, job: Job, event: Event) -> None:
        with self._lock:
            self._outstanding -= 1
        job.deliver(event)

    def _fail_engine(self, cfg: DecodeConfig, message: str) -> None:
        self._engines.pop(cfg, None)
        for key in [k for k in self._jobs if k[0] == cfg]:
            job = self._jobs.pop(key)
            self._finish(job, Event("error", job.index, text=message))
        self._busy = sum(e.busy for e in self._engines.values())

    def _cancel_all(self, message: str) -> None:
        for job in self._jobs.values():
            self._finish(job, Event("error", job.index, text=message))
        self._jobs.clear()
        while True:  # jobs still in the inbox are answered too
            try:
                kind, jobs = self._inbox.get_nowait()
            except queue.Empty:
                return
            for job in jobs if kind == "submit" else ():
                self._finish(job, Event("error", job.index, text=message))
