"""``dultra serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra) in which one
thread owns the device and concurrent requests share the decode engines' slots (docs/serving.md)."""

from dultra_jax.serve.app import create_app
from dultra_jax.serve.run import serve

__all__ = ["create_app", "serve"]
