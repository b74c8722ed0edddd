"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dultra_jax.text import Completion

WINDOW_S = 30.0  # tokens/s is measured over this trailing window


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker_stats):
        """``worker_stats()`` -> (waiting prompts, busy slots, slots); read at scrape time."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dultra_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("dultra_request_seconds", "time from request to last byte", ["endpoint"],
                                 registry=r)
        self.first_chunk = Histogram("dultra_time_to_first_chunk_seconds", "streaming: time to the first text chunk",
                                     registry=r)
        self.tokens = Counter("dultra_completion_tokens", "answer tokens returned", registry=r)
        self.effective = Counter("dultra_effective_tokens", "generated ids that are not end-of-text/pad/MASK",
                                 registry=r)
        self.forwards = Counter("dultra_forwards", "NFE summed over answers (forwards each prompt decoded in)",
                                registry=r)
        self.cancelled = Counter("dultra_cancelled", "prompts cancelled (client gone, or shutdown)", registry=r)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()
        self._eff_sum = self._nfe_sum = 0.0
        Gauge("dultra_queue_depth", "prompts waiting for a slot", registry=r).set_function(
            lambda: worker_stats()[0])
        Gauge("dultra_busy_slots", "slots decoding a prompt", registry=r).set_function(lambda: worker_stats()[1])
        Gauge("dultra_slots", "slots per engine", registry=r).set_function(lambda: worker_stats()[2])
        Gauge("dultra_tokens_per_second", f"answer tokens per second over the last {WINDOW_S:.0f} s",
              registry=r).set_function(self._rate)
        Gauge("dultra_tokens_per_forward", "effective tokens / NFE over all answers (TPF)",
              registry=r).set_function(self._tpf)

    def completed(self, c: Completion, _step_seconds: float) -> None:
        n = len(c.token_ids)
        self.tokens.inc(n)
        self.effective.inc(c.tokens_per_forward * c.nfe)
        self.forwards.inc(c.nfe)
        with self._lock:
            self._recent.append((time.monotonic(), n))
            self._eff_sum += c.tokens_per_forward * c.nfe
            self._nfe_sum += c.nfe

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW_S

    def _tpf(self) -> float:
        with self._lock:
            return self._eff_sum / self._nfe_sum if self._nfe_sum else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
