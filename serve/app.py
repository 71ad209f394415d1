"""The OpenAI-compatible HTTP app over one `Pipeline` (Starlette): `POST /v1/chat/completions` (JSON or Server-Sent
Events), `GET /v1/models`, `GET /health`, `GET /metrics`. Bad requests get a 4xx OpenAI error body; the server goes
on. Answers carry btp's extensions under the `btp` key (kept image tokens per stage, timings)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from btp.runtime.errors import BtpError, InputError, RequestError
from btp.runtime.pipeline import Pipeline

from .batcher import Batcher, Job, Result
from .metrics import Metrics
from .protocol import ChatRequest, Limits, decode_image, error_body, image_bytes, parse_body, parse_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts (the `btp-serve` options)."""

    model_name: str = "btp"
    max_batch: int = 8  # at most the artifact's max batch
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 60.0
    limits: Limits = field(default_factory=Limits)


def create_app(pipe: Pipeline, options: ServeOptions) -> Starlette:
    """The app; its batcher starts with the app's lifespan and drains before shutdown ends."""
    metrics = Metrics(pipe.spec.image_tokens, options.max_batch)
    batcher = Batcher(pipe, metrics, options.max_batch, options.batch_wait_ms / 1e3, options.max_queue)
    created = int(time.time())

    def refuse(err: BtpError) -> JSONResponse:
        status = getattr(err, "status", 400)
        metrics.requests.labels(status=str(status)).inc()
        return JSONResponse(error_body(err), status_code=status)

    def prepare(req: ChatRequest):
        image = decode_image(image_bytes(req.image_url, options.limits), options.limits)
        try:
            return pipe.prepare([image], [req.prompt])
        except InputError as err:
            raise RequestError(str(err), param="messages", code="invalid_prompt") from err

    async def chat(request: Request) -> Response:
        try:
            body = parse_body(await _read_body(request, options.limits.max_body_bytes))
            req = parse_chat(body, options.limits)
            if req.model and req.model != options.model_name:
                raise RequestError(f"model: expected {options.model_name!r}, found {req.model!r}", status=404,
                                   param="model", code="model_not_found")
            inputs = await run_in_threadpool(prepare, req)
            job = Job(req, inputs, asyncio.get_running_loop())
            batcher.submit(job)
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), options.timeout_s)
            except asyncio.TimeoutError:
                job.cancel()
                raise RequestError(f"timed out after {options.timeout_s:g} s in the queue (btp-serve --timeout)",
                                   status=503, code="timeout") from None
        except BtpError as err:
            return refuse(err)
        if req.stream:
            metrics.requests.labels(status="200").inc()
            return StreamingResponse(_events(job, req, options.model_name), media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            while kind not in ("done", "error"):
                kind, payload = await job.events.get()
        finally:
            watcher.cancel()
        if kind == "error":
            return refuse(RequestError(f"the batch failed: {type(payload).__name__}: {payload}", status=500,
                                       code="internal_error"))
        metrics.requests.labels(status="200").inc()
        return JSONResponse(_completion(payload, options.model_name))

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": options.model_name, "object": "model",
                                                         "created": created, "owned_by": "btp"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": len(batcher._pending), "running": batcher.running})

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return refuse(RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                                   code="not_found" if exc.status_code == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.error("the batcher stopped: %r", t.exception()))
        yield
        while not batcher.idle:  # SIGTERM: uvicorn has waited for open requests; anything queued finishes too
            await asyncio.sleep(0.01)
        task.cancel()
        batcher.close()

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", metrics_page)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.metrics, app.state.batcher = metrics, batcher
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (from Content-Length, else while it streams in)."""
    declared = request.headers.get("content-length", "")
    too_big = RequestError(f"the body is over {limit} bytes (btp-serve --max-body-bytes)", status=413,
                           code="body_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when its client goes away before the answer."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _extensions(result: Result) -> dict:
    return {"kept_image_tokens": result.kept, "timings": result.timings}


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _completion(result: Result, model: str) -> dict:
    """The non-streamed `chat.completion` object."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result), "btp": _extensions(result)}


async def _events(job: Job, req: ChatRequest, model: str):
    """Server-Sent Events in the OpenAI chunk format, ending with `data: [DONE]`; a client that leaves cancels
    the job (its row leaves the batch)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        doc = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(doc)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                yield chunk({}, payload.finish_reason, btp=_extensions(payload))
                if req.include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(payload)})}\n\n"
                break
            elif kind == "error":
                err = RequestError(f"the batch failed: {type(payload).__name__}: {payload}", status=500)
                yield f"data: {json.dumps(error_body(err))}\n\n"
                break
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            job.cancel()
