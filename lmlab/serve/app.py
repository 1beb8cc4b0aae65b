"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the continuous-batching engine.

Endpoints as llama.cpp's server and vLLM's: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (the model's chat template), `stream: true` as server-sent events in OpenAI's
chunk format ending with `data: [DONE]`; and `GET /`, a static chat page (lmlab/serve/static/index.html).
The `model` field picks the base model or one of the LoRA adapters loaded at start.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a bad request (invalid
JSON, a missing or mistyped field, a value out of range, an unknown model, a prompt longer than the
context), 401 without the API key when one is set, 503 when the waiting queue is full. A client that
disconnects cancels its request, which frees its rows before the next decode step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import LmlabError
from lmlab.generation.generate import encode_chat, encode_prompt
from lmlab.generation.sampling import SamplingConfig
from lmlab.serve import protocol as api
from lmlab.serve.engine import Delta, Engine, Failed, Handle, QueueFull
from lmlab.serve.engine import Request as EngineRequest

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error answered with OpenAI's error shape and this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Served:
    """What the server serves: the engine, its tokenizer, the base model's id and the adapters' ids."""

    engine: Engine
    tokenizer: Any
    name: str
    adapters: list[str] = field(default_factory=list)
    api_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # shown under /v1/models "meta"

    @property
    def context(self) -> int:
        return self.engine.cfg.context

    def adapter_for(self, model: str) -> str | None:
        if model == self.name:
            return None
        if model in self.adapters:
            return model
        raise ApiError(400, f"model {model!r} not found; available: {[self.name, *self.adapters]}",
                       param="model", code="model_not_found")

    def check_prompt(self, ids: list[int]) -> list[int]:
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.context} "
                           "tokens (prompt and output together)", param="prompt", code="context_length_exceeded")
        return ids

    def engine_request(self, body: api._Common, ids: list[int], limit: int | None, logprobs: int | None) -> EngineRequest:
        """max_tokens defaults to, and is capped at, what the context leaves after the prompt."""
        room = self.context - len(ids)
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p if body.top_p < 1 else None, min_p=body.min_p, epsilon=body.epsilon)
        return EngineRequest(ids, min(limit, room) if limit is not None else room, sampling, body.seed, body.n,
                             body.stop_strings, self.adapter_for(body.model), logprobs)


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="lmlab serve", summary="OpenAI-compatible API over lmlab's continuous-batching engine")
    app.state.served = served

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(ApiError(400, _validation_message(err), param=_validation_param(err)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(err.status_code, str(err.detail), kind="not_found_error" if err.status_code == 404
                               else "invalid_request_error"))

    @app.exception_handler(ApiError)
    async def _api(_request: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(QueueFull)
    async def _busy(_request: Request, err: QueueFull) -> JSONResponse:
        return _error(ApiError(503, str(err), kind="unavailable_error", code="queue_full"))

    @app.exception_handler(LmlabError)
    async def _user(_request: Request, err: LmlabError) -> JSONResponse:
        return _error(ApiError(400, str(err)))

    async def authorized(request: Request) -> None:
        key = served.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "invalid or missing API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **served.engine.load()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        base = {"object": "model", "created": api.now(), "owned_by": "lmlab"}
        data = [{**base, "id": served.name, "meta": {**served.info, "context": served.context}}]
        data += [{**base, "id": a, "parent": served.name, "meta": {"adapter": True}} for a in served.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: api.CompletionRequest, request: Request) -> Any:
        tok = served.tokenizer
        ids = [served.check_prompt(list(p) if isinstance(p, list) else encode_prompt(tok, p)) for p in body.prompts]
        reqs = [served.engine_request(body, x, body.max_tokens, body.logprobs) for x in ids]
        return await _respond(served, request, body, reqs, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Any:
        ids = served.check_prompt(encode_chat(served.tokenizer, [m.as_dict() for m in body.messages]))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(served, request, body, [served.engine_request(body, ids, body.token_limit, logprobs)],
                              chat=True)

    return app


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(api.error_body(err.message, err.kind, err.param, err.code), status_code=err.status)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == "json_invalid":
            return f"invalid JSON in the request body: {e.get('ctx', {}).get('error', e.get('msg'))}"
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def _validation_param(err: RequestValidationError) -> str | None:
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if loc:
            return loc[0]
    return None


async def _respond(served: Served, request: Request, body: api._Common, reqs: list[EngineRequest], chat: bool) -> Any:
    """Submit the requests (503 if the queue is full) and answer as one JSON or as a stream of chunks."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink_for(k: int):
        return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (k, event))

    handles = served.engine.submit(reqs, [sink_for(k) for k in range(len(reqs))])
    reply = _Reply(served.name, body, chat, n_prompts=len(reqs), prompt_tokens=sum(len(r.prompt) for r in reqs))
    if body.stream:
        return StreamingResponse(_stream(reply, queue, handles), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while reply.remaining:
            try:
                k, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if isinstance(event, Failed):
                return _error(ApiError(event.status, event.message, kind="server_error"))
            reply.add(k, event)
        return reply.whole()
    finally:
        for h in handles:
            h.cancel()


async def _stream(reply: _Reply, queue: asyncio.Queue, handles: list[Handle]) -> AsyncIterator[str]:
    """Server-sent events; cancelled by Starlette when the client disconnects, which cancels the handles."""
    try:
        if reply.chat:
            yield reply.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(reply.total)])
        while reply.remaining:
            k, event = await queue.get()
            if isinstance(event, Failed):
                yield f"data: {json.dumps(api.error_body(event.message, 'server_error', code=event.status))}\n\n"
                break
            for choice in reply.add(k, event):
                yield reply.chunk([choice])
        else:
            if reply.body.include_usage:
                yield reply.chunk([], usage=True)
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()


class _Reply:
    """Assembles deltas into OpenAI responses or stream chunks (completions or chat)."""

    def __init__(self, model: str, body: api._Common, chat: bool, n_prompts: int, prompt_tokens: int) -> None:
        self.model, self.body, self.chat = model, body, chat
        self.id = api.new_id("chatcmpl" if chat else "cmpl")
        self.created = api.now()
        self.total = n_prompts * body.n
        self.remaining = self.total
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.texts = [""] * self.total
        self.entries: list[list[dict]] = [[] for _ in range(self.total)]
        self.reasons: list[str | None] = [None] * self.total

    def add(self, k: int, event: Delta) -> list[dict]:
        """Record a delta; return the stream choices it makes (text, then the finish)."""
        i = k * self.body.n + event.index
        self.texts[i] += event.text
        self.entries[i] += event.logprobs or []
        out = []
        if event.text or event.logprobs:
            out.append(self._choice(i, event.text, event.logprobs, None))
        if event.finish_reason:
            self.reasons[i] = event.finish_reason
            self.remaining -= 1
            self.completion_tokens += event.completion_tokens
            out.append(self._choice(i, "", None, event.finish_reason))
        return out

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        if not entries:
            return None
        return api.chat_logprobs(entries) if self.chat else api.completion_logprobs(entries)

    def _choice(self, i: int, text: str, entries: list[dict] | None, reason: str | None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            return {"index": i, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": self._logprobs(entries), "finish_reason": reason}

    def chunk(self, choices: list[dict], usage: bool = False) -> str:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.body.model, "choices": choices}
        if usage:
            obj["usage"] = api.usage(self.prompt_tokens, self.completion_tokens)
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def whole(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t},
                        "logprobs": self._logprobs(self.entries[i]), "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": self._logprobs(self.entries[i]), "finish_reason": r}
                       for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": choices,
                "usage": api.usage(self.prompt_tokens, self.completion_tokens)}
