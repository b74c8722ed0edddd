"""Run the app under uvicorn: SIGTERM/SIGINT stop admitting, in-flight requests drain within a bound, exit 0."""

from __future__ import annotations

import signal
import sys

from dultra_jax.text import TextModel

# The worker thread gives up the GIL at every device wait and must win it back from the event loop thread; under
# load each win can take Python's whole switch interval (default 5 ms), longer than a small model's segment.
SWITCH_INTERVAL_S = 0.001


def serve(text: TextModel, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          max_queue: int = 256, plan=None, drain_s: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT; returns once in-flight requests have finished or been cancelled."""
    import uvicorn

    from dultra_jax.serve.app import create_app

    app = create_app(text, model_name=model_name, slots=slots, max_queue=max_queue, plan=plan, drain_s=drain_s)
    worker = app.state.worker

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # new requests get 503 while the open ones finish; what is left after drain_s is answered 503 too
            worker.drain(drain_s)
            super().handle_exit(sig, frame)

    # uvicorn's own bound is a backstop: the worker answers every open request before it
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s + 10,
                            access_log=log_level == "debug")
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers in place that is
    # harmless and the process exits 0 after a clean drain
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
    try:
        _Server(config).run()
    finally:
        sys.setswitchinterval(interval)
        for s, h in previous.items():
            signal.signal(s, h)
