"""OpenAI-compatible HTTP routes over a :class:`~dultra_jax.serve.worker.Worker` (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events in the OpenAI chunk format), ``GET /health``, ``GET /metrics`` (Prometheus text), and
vLLM's ``/tokenizer_info``, ``/tokenize``, ``/detokenize`` (lm-eval's ``local-completions`` reads them). Errors are
OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (validation
included, as vLLM does, rather than FastAPI's 422), 404 for an unknown model, 429 when the queue is full, 503
while shutting down. What the server accepts and refuses, and why: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field

from dultra_jax.decoding.loop import check_prompts
from dultra_jax.serve.metrics import Metrics
from dultra_jax.serve.worker import Draining, Event, Job, QueueFull, Worker
from dultra_jax.text import Completion, TextModel

KEEPALIVE_S = 15.0
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


# ------------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # dLLM options (DecodeConfig fields; validated there)
    strategy: Literal["planner", "threshold", "factor", "fixed"] | None = None
    reveal: Literal["bernoulli", "topk"] | None = None
    threshold: float | None = None
    factor: float | None = None
    factor_rule: Literal["original", "corrected"] | None = None
    block_length: int | None = Field(None, ge=1)
    gen_length: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    planner_temperature: float | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    early_stop: bool | None = None


DLLM_FIELDS = ("strategy", "reveal", "threshold", "factor", "factor_rule", "block_length", "gen_length", "steps",
               "planner_temperature", "cache", "early_stop", "temperature")


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


# ------------------------------------------------------------------------------------------ the app
def create_app(text: TextModel, *, model_name: str, slots: int = 8, max_queue: int = 256, plan=None,
               drain_s: float = 30.0) -> FastAPI:
    """The server's app; its lifespan starts the device thread and, at shutdown, drains it within ``drain_s``."""
    holder: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop, drain_s)

    metrics = Metrics(lambda: (holder["w"].waiting, holder["w"].busy, slots))
    worker = Worker(text, slots=slots, max_queue=max_queue, plan=plan, metrics=metrics)
    holder["w"] = worker
    app = FastAPI(title="dultra serve", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.text = worker, metrics, text
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        headers = {"retry-after": "1"} if e.status == 429 else None
        return JSONResponse(error_body(e.status, e.message, e.type, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        extra = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid request")
        msg = f"{loc}: {extra}" if loc else extra
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(400, msg, param=loc), status_code=400)

    @app.get("/health")
    async def health():
        if not worker.admitting:
            raise ApiError(503, "the server is shutting down", type_="service_unavailable")
        return {"status": "ok", "waiting": worker.waiting, "busy": worker.busy, "slots": slots}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    # vLLM's tokenizer routes (lm-eval's local-completions uses them instead of loading an HF tokenizer)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = text.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": text.model.cfg.max_sequence_length}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        return {"tokens": list(text.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        return {"prompt": text.tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dultra-jax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo or body.logprobs or (body.best_of or 1) > 1 or body.suffix:
            raise ApiError(400, "echo, logprobs, best_of and suffix are not served: a diffusion model has no "
                                "left-to-right token log-probabilities; run likelihood tasks in process "
                                "(docs/serving.md)", param="logprobs" if body.logprobs else "echo")
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = [_encode(text, x, param="prompt") for x in prompts]
        return await _serve(request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if body.logprobs:
            raise ApiError(400, "logprobs are not served: a diffusion model has no left-to-right token "
                                "log-probabilities (docs/serving.md)", param="logprobs")
        messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        ids = [_encode(text, messages, param="messages")]
        return await _serve(request, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    async def _serve(request: Request, body: _Body, ids: list[list[int]], max_tokens: int | None, *, chat: bool):
        t0 = time.perf_counter()
        path = request.url.path
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {model_name!r}",
                           type_="not_found_error", param="model")
        if body.n != 1:
            raise ApiError(400, "n must be 1 (send the prompt several times with different seeds)", param="n")
        if body.top_p not in (None, 1, 1.0) or body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "top_p, presence_penalty and frequency_penalty are not supported by the diffusion "
                                "decoder (use temperature and the dLLM options)", param="top_p")
        cfg = _settings(text, body, max_tokens)
        for row in ids:
            try:
                check_prompts(_as_row(row), text.model.cfg, cfg.gen_length)
            except ValueError as e:
                raise ApiError(400, str(e), param="prompt") from None
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seed = text.seed if body.seed is None else int(body.seed)
        jobs = [Job(ids=row, seed=seed, cfg=cfg, deliver=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                    index=i, stop=stop, max_tokens=max_tokens, stream=body.stream) for i, row in enumerate(ids)]
        try:
            worker.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error") from None
        except Draining as e:
            raise ApiError(503, str(e), type_="service_unavailable") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        prompt_tokens = sum(len(r) for r in ids)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            gen = _stream(request, rid, jobs, events, chat, prompt_tokens, include_usage, t0)
            return EventSourceResponse(gen, headers={"Cache-Control": "no-cache"})
        done: dict[int, Completion] = {}
        try:
            while len(done) < len(jobs):
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        worker.cancel(jobs)
                        metrics.requests.labels(path, "499").inc()
                        return Response(status_code=499)
                    continue
                if ev.kind == "error":
                    worker.cancel(jobs)
                    raise ApiError(500 if worker.admitting else 503, ev.text, type_="server_error")
                if ev.kind == "done":
                    done[ev.index] = ev.completion
        except asyncio.CancelledError:
            worker.cancel(jobs)
            raise
        choices = [_choice(chat, i, done[i]) for i in range(len(jobs))]
        metrics.requests.labels(path, "200").inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": _usage(prompt_tokens, list(done.values()))}

    async def _stream(request, rid, jobs, events, chat, prompt_tokens, include_usage, t0):
        path = request.url.path
        obj = "chat.completion.chunk" if chat else "text_completion"
        created_ = int(time.time())

        def chunk(choices, usage=None) -> bytes:
            body = {"id": rid, "object": obj, "created": created_, "model": model_name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return format_sse_event(data_str=json.dumps(body))

        def piece(i, text_, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": text_} if role else ({"content": text_} if text_ else {})
                return {"index": i, "delta": delta, "finish_reason": finish}
            return {"index": i, "text": text_, "finish_reason": finish, "logprobs": None}

        sent = [""] * len(jobs)
        finished: dict[int, Completion] = {}
        first = True
        complete = False
        try:
            if chat:
                yield chunk([piece(j.index, "", role=True) for j in jobs])
            quiet = time.perf_counter()
            while len(finished) < len(jobs):
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    # the server notices a closed stream only when it writes: ask, so the slots free now
                    if await request.is_disconnected():
                        metrics.requests.labels(path, "499").inc()
                        return
                    if time.perf_counter() - quiet > KEEPALIVE_S:
                        quiet = time.perf_counter()
                        yield format_sse_event(comment="keepalive")
                    continue
                quiet = time.perf_counter()
                if ev.kind == "error":
                    yield format_sse_event(data_str=json.dumps(error_body(500, ev.text, "server_error")))
                    break
                if ev.kind == "delta":
                    sent[ev.index] += ev.text
                    new = ev.text
                    fin = None
                else:
                    c = finished[ev.index] = ev.completion
                    new = c.text[len(sent[ev.index]):] if c.text.startswith(sent[ev.index]) else ""
                    fin = c.finish_reason
                if first and new:
                    metrics.first_chunk.observe(time.perf_counter() - t0)
                    first = False
                yield chunk([piece(ev.index, new, fin)])
            else:
                complete = True
                if include_usage:
                    yield chunk([], _usage(prompt_tokens, list(finished.values())))
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(path, "200" if complete else "500").inc()
            metrics.latency.labels(path).observe(time.perf_counter() - t0)
        finally:
            if not complete:  # the client went away (or decoding failed): free the slots
                worker.cancel(jobs)

    return app


def _content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "only text content parts are served", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _encode(text: TextModel, prompt, *, param: str) -> list[int]:
    try:
        return text.encode(prompt)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None


def _as_row(ids: list[int]):
    import numpy as np

    return np.asarray(ids, np.int64)[None]


def _settings(text: TextModel, body: _Body, max_tokens: int | None):
    over = {k: getattr(body, k) for k in DLLM_FIELDS if getattr(body, k) is not None}
    block = over.get("block_length", text.defaults.block_length)
    if "gen_length" not in over:
        if max_tokens is not None:  # the canvas: max_tokens rounded up to whole blocks
            over["gen_length"] = -(-max_tokens // block) * block
        elif "block_length" in over and text.defaults.gen_length % block:
            over["gen_length"] = -(-text.defaults.gen_length // block) * block
    try:
        return text.settings(**over)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from None


def _choice(chat: bool, i: int, c: Completion) -> dict:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None}
    return {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}


def _usage(prompt_tokens: int, done: list[Completion]) -> dict:
    completion = sum(len(c.token_ids) for c in done)
    nfe = sum(c.nfe for c in done)
    eff = sum(c.tokens_per_forward * c.nfe for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "nfe": nfe, "tokens_per_forward": eff / nfe if nfe else 0.0}
