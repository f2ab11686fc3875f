"""The OpenAI-compatible HTTP API over a `ModelWorker` (FastAPI; server-sent events for streams).

    GET  /v1/models, /v1/models/{id}     the one model served
    POST /v1/chat/completions            messages through the chat template
    POST /v1/completions                 a text prompt (or token ids)
    GET  /health                         the worker alive, requests waiting
    GET  /                               the chat page (one static HTML file)

Bodies and stream chunks follow OpenAI's layout (`data: {...}` lines, then `data: [DONE]`); Celeris's own
figures (tokens per target step, KV bytes, time to first token) ride in an extra `celeris` field. With an
API key, /v1/* answers 401 without `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from celeris.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_prompt_ids,
    completion_prompt_ids,
    parse_body,
    sampling_params,
)
from celeris.serve.worker import Delta, Failed, Finished, GenerationRequest, ModelWorker, WorkerBusy

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far past any context served here


@dataclass(frozen=True)
class _Layout:
    """What differs between a chat completion and a text completion."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(self, text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def chunk_choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        """text None: the chat stream's opening chunk (the role)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


CHAT = _Layout("chat.completion", "chat.completion.chunk", "chatcmpl-", True)
TEXT = _Layout("text_completion", "text_completion", "cmpl-", False)


def usage(done: Finished) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(worker: ModelWorker, model_id: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over `worker`, serving it as `model_id`; the worker starts and stops with the app."""
    created = int(time.time())
    page = (files("celeris.serve") / "static" / "chat.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    # No /docs: FastAPI's pages load their scripts from a CDN.
    app = FastAPI(title="Celeris", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(APIError(422, str(exc.errors()[:1]), None, "invalid_value").body(), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug, not the client's doing; the server lives on
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    def model_card() -> dict[str, Any]:
        e = worker.engine
        return {"id": model_id, "object": "model", "created": created, "owned_by": "celeris",
                "celeris": {"max_context": worker.max_context, "drafter": worker.drafter is not None,
                            "max_batch": worker.max_batch, "engine": e.info.to_dict()}}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'", "model", "model_not_found")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"the request body is over {max_body_bytes} bytes", None, "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise APIError(413, f"the request body is over {max_body_bytes} bytes", None, "request_too_large")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None

    async def complete(request: Request, layout: _Layout):
        kind = ChatCompletionRequest if layout.chat else CompletionRequest
        body = parse_body(await read_json(request), kind)
        check_model(body.model)
        tok = worker.tokenizer
        if layout.chat:
            ids = await run_in_threadpool(chat_prompt_ids, tok, body.messages)
        else:
            ids = await run_in_threadpool(completion_prompt_ids, tok, body.prompt, worker.engine.model.config.vocab_size)
        params = sampling_params(body, len(ids), worker.max_context, worker.memory is not None)
        req = GenerationRequest(ids, params)
        try:
            worker.submit(req)
        except WorkerBusy as exc:
            raise APIError(503, str(exc), None, "server_overloaded") from None
        head = {"id": layout.id_prefix + uuid.uuid4().hex[:24], "created": int(time.time()), "model": model_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, layout, head, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer(request, req, layout, head)

    async def answer(request: Request, req: GenerationRequest, layout: _Layout, head: dict[str, Any]):
        watcher = asyncio.create_task(cancel_on_disconnect(request, req))
        text = []
        try:
            async for ev in req:
                if isinstance(ev, Delta):
                    text.append(ev.text)
                elif isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message)
                elif isinstance(ev, Finished):
                    return {**head, "object": layout.object, "choices": [layout.choice("".join(text), ev.reason)],
                            "usage": usage(ev), "celeris": ev.stats}
        finally:
            watcher.cancel()
            req.cancel()

    async def cancel_on_disconnect(request: Request, req: GenerationRequest) -> None:
        """The body is read: the next ASGI message is the client hanging up."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        req.cancel()

    async def stream(req: GenerationRequest, layout: _Layout, head: dict[str, Any], include_usage: bool):
        chunk = {**head, "object": layout.chunk_object}
        extra = {"usage": None} if include_usage else {}
        try:  # a client that hangs up cancels this generator (Starlette), and with it the request
            if layout.chat:
                yield sse({**chunk, "choices": [layout.chunk_choice(None, None)], **extra})
            async for ev in req:
                if isinstance(ev, Delta) and ev.text:
                    yield sse({**chunk, "choices": [layout.chunk_choice(ev.text, None)], **extra})
                elif isinstance(ev, Failed):
                    yield sse(APIError(ev.status, ev.message).body())
                    return
                elif isinstance(ev, Finished):
                    yield sse({**chunk, "choices": [layout.chunk_choice("", ev.reason)], **extra, "celeris": ev.stats})
                    if include_usage:
                        yield sse({**chunk, "choices": [], "usage": usage(ev)})
            yield sse("[DONE]")
        finally:
            req.cancel()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, CHAT)

    @v1.post("/completions")
    async def completions(request: Request):
        return await complete(request, TEXT)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_id, "waiting": worker.queue.qsize(),
                "busy": bool(worker.running), "running": len(worker.running), "served": worker.served,
                "kv_cache_bytes": worker.kv_bytes}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    return app
