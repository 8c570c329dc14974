"""`specexec api`: an OpenAI-compatible HTTP server over one loaded `LLM` (FastAPI + uvicorn).

Requests go to the model's FIFO queue (`api.Scheduler`): one generation at a time, so each
answer is exactly what it would be alone. A client that disconnects has its generation
cancelled between rounds; past `max_queued` waiting requests the server answers 429.
Bad input gets OpenAI's error object with status 400, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict

from specexec.launch.api import LLM, Busy, Completion, PromptTooLong, is_last
from specexec.launch.metrics import Metrics

log = logging.getLogger("specexec.api")

HEALTH_FRESH_S = 30.0  # a round accepted this recently proves the verifier answers
PROBE_TIMEOUT_S = 30.0
DISCONNECT_POLL_S = 0.25
OPENAI_FINISH = {"stop": "stop", "length": "length", "context": "length", "interrupted": "abort"}

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Stop = Union[Annotated[str, Strict()], list[Annotated[str, Strict()]], None]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Annotated[str, Strict()]
    content: Annotated[str, Strict()]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share; unknown fields are accepted and ignored (as vLLM does)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: Annotated[Int | None, Field(ge=1)] = None
    temperature: Annotated[Float | None, Field(ge=0)] = None
    top_p: Annotated[Float | None, Field(gt=0, le=1)] = None
    seed: Annotated[Int | None, Field(ge=0, lt=2**63)] = None
    top_k: Annotated[Int | None, Field(ge=-1)] = None  # -1 or 0: off (vLLM's -1 accepted)
    min_p: Annotated[Float | None, Field(ge=0, le=1)] = None
    repetition_penalty: Annotated[Float | None, Field(gt=0)] = None  # vLLM's name; 1: off
    frequency_penalty: Float | None = None  # OpenAI's; only 0 (off) is supported
    presence_penalty: Float | None = None  # OpenAI's; only 0 (off) is supported
    stop: Stop = None
    stream: Annotated[bool, Strict()] = False
    stream_options: StreamOptions | None = None
    n: Annotated[Int, Field(ge=1, le=1)] = 1
    budget: Annotated[Int | None, Field(ge=1)] = None  # ours: the draft tree size for this request
    method: str | None = None  # ours: specexec, specinfer, chain, autoregressive

    def settings(self) -> dict:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (only 0); use repetition_penalty, which is applied "
                                    "to the target's and the draft's distributions alike", param=name)
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    seed=self.seed, stop=self.stop, budget=self.budget, method=self.method,
                    top_k=None if self.top_k is None else max(self.top_k, 0), min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty)


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: Annotated[Int | None, Field(ge=1)] = None

    def settings(self) -> dict:
        out = super().settings()
        if self.max_completion_tokens is not None:
            out["max_new_tokens"] = self.max_completion_tokens
        return out


class CompletionRequest(Sampling):
    prompt: Union[Annotated[str, Strict()], list[Annotated[str, Strict()]]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def create_app(llm: LLM, model_name: str, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app; `llm` must be built with `metrics.on_round` / `metrics.on_result` as hooks."""
    metrics = metrics or Metrics()
    metrics.watch(llm.scheduler)
    app = FastAPI(title="specexec", docs_url=None, redoc_url=None)
    _errors(app, metrics)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "specexec"}]}

    @app.get("/health")
    async def health():
        ok, why = await _healthy(llm)
        metrics.requests.labels("/health", 200 if ok else 503).inc()
        if ok:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
        return await _answer(llm, metrics, http, "/v1/chat/completions", body, messages, None, _ChatShape(model_name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return await _answer(llm, metrics, http, "/v1/completions", body, prompt, False, _TextShape(model_name))

    return app


def _errors(app: FastAPI, metrics: Metrics) -> None:
    """Every failure as OpenAI's error object; 400 for anything the client sent wrong."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        where = ".".join(loc) or "body"
        metrics.requests.labels(request.url.path, 400).inc()
        return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid request')}",
                                       param=loc[0] if loc else None), status_code=400)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, err: ApiError):
        metrics.requests.labels(request.url.path, err.status).inc()
        return JSONResponse(error_body(err.message, err.kind, err.param), status_code=err.status)

    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, err: Exception):
        log.exception("request to %s failed", request.url.path)
        metrics.requests.labels(request.url.path, 500).inc()
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)


async def _healthy(llm: LLM) -> tuple[bool, str]:
    """Ready when the verifier answered lately: a recent round, or a one-token probe now."""
    if llm.last_error is None and time.monotonic() - llm.last_round_at < HEALTH_FRESH_S:
        return True, ""
    try:
        done = await asyncio.wait_for(_collect(llm, llm.probe()), PROBE_TIMEOUT_S)
    except Busy:
        return bool(llm.scheduler.active), "the request queue is full"
    except asyncio.TimeoutError:
        return False, f"no answer from the verifier within {PROBE_TIMEOUT_S:g} s"
    except Exception as err:  # the probe's failure is the health report
        return False, str(err)
    return (done.error is None, done.error or "")


# -- running one request ---------------------------------------------------------------------

async def _events(llm: LLM, request) -> AsyncIterator[object]:
    """The job's events (text pieces, then a Completion) on this event loop; leaving cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(item):
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    job = llm.submit(request, sink)
    try:
        while True:
            item = await queue.get()
            last = is_last(item)
            yield item
            if last:
                return
    finally:
        job.cancel.set()


async def _next(events, http: HttpRequest | None):
    """The next event; a client that went away meanwhile cancels the wait (and so its job)."""
    step = asyncio.ensure_future(events.__anext__())
    while not step.done():
        await asyncio.wait([step], timeout=DISCONNECT_POLL_S)
        if not step.done() and http is not None and await http.is_disconnected():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await step
            raise ApiError(499, "client disconnected")
    return step.result()


async def _collect(llm: LLM, request, http: HttpRequest | None = None) -> Completion:
    """The Completion; a client that goes away cancels its generation."""
    events = _events(llm, request)
    try:
        while not isinstance(item := await _next(events, http), Completion):
            pass
        return item
    finally:
        await events.aclose()


def _build(llm: LLM, body: Sampling, prompt, chat: bool | None):
    try:
        return llm.request(prompt, chat=chat, **body.settings())
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def _check(done: Completion) -> Completion:
    if done.error and not done.token_ids:
        raise ApiError(503, f"the verifier is unavailable: {done.error}", "server_error")
    return done


async def _answer(llm: LLM, metrics: Metrics, http: HttpRequest, endpoint: str, body: Sampling, prompt, chat,
                  shape) -> Response:
    request = _build(llm, body, prompt, chat)
    try:
        if body.stream:
            response = await _stream(llm, request, http, shape, body)
        else:
            response = JSONResponse(shape.whole(_check(await _collect(llm, request, http))))
    except Busy as err:
        raise ApiError(429, f"server busy: {err}", "rate_limit_error") from None
    except PromptTooLong as err:
        raise ApiError(400, str(err), param="messages" if chat is None else "prompt") from None
    metrics.requests.labels(endpoint, 200).inc()
    return response


async def _stream(llm: LLM, request, http: HttpRequest, shape, body: Sampling) -> StreamingResponse:
    """Wait for the first event before answering 200, so that a full queue, a prompt too long or a
    lost verifier still get their error status."""
    events = _events(llm, request)
    try:
        first = await _next(events, http)
        if isinstance(first, Completion):
            _check(first)
    except BaseException:
        await events.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_sse(events, first, shape, include_usage), media_type="text/event-stream")


async def _sse(events, item, shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the opening chunk, one chunk per text piece, the closing chunk, [DONE].
    A client that goes away cancels this generator, and closing `events` cancels its job."""
    try:
        yield _data(shape.opening())
        while not isinstance(item, Completion):
            yield _data(shape.piece(item))
            item = await events.__anext__()
        yield _data(shape.closing(item))
        if include_usage:
            yield _data(shape.usage_chunk(item))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(done: Completion) -> dict:
    n = len(done.token_ids)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": n, "total_tokens": done.prompt_tokens + n}


class _Shape:
    """The OpenAI response objects of one endpoint."""

    prefix = ""
    object = ""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"{self.prefix}{uuid.uuid4().hex}", int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage_chunk(self, done: Completion) -> dict:
        return {**self._head(self.object + ".chunk" if self.prefix == "chatcmpl-" else self.object),
                "choices": [], "usage": _usage(done)}


class _ChatShape(_Shape):
    prefix, object = "chatcmpl-", "chat.completion"

    def whole(self, done: Completion) -> dict:
        message = {"role": "assistant", "content": done.text}
        return {**self._head(self.object), "choices": [
            {"index": 0, "message": message, "finish_reason": OPENAI_FINISH[done.finish_reason], "logprobs": None}],
            "usage": _usage(done), "specexec": done.stats}

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def opening(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def piece(self, text: str) -> dict:
        return self._chunk({"content": text})

    def closing(self, done: Completion) -> dict:
        return self._chunk({}, OPENAI_FINISH[done.finish_reason])


class _TextShape(_Shape):
    prefix, object = "cmpl-", "text_completion"

    def whole(self, done: Completion) -> dict:
        return {**self._head(self.object), "choices": [
            {"index": 0, "text": done.text, "finish_reason": OPENAI_FINISH[done.finish_reason], "logprobs": None}],
            "usage": _usage(done), "specexec": done.stats}

    def _chunk(self, text: str, finish: str | None = None) -> dict:
        return {**self._head(self.object),
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def opening(self) -> dict:
        return self._chunk("")

    def piece(self, text: str) -> dict:
        return self._chunk(text)

    def closing(self, done: Completion) -> dict:
        return self._chunk("", OPENAI_FINISH[done.finish_reason])


# -- the command -----------------------------------------------------------------------------------

def serve(models, link, placement, tree, host: str = "127.0.0.1", port: int = 8000, max_queued: int = 64,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Load the pair once, check the verifier answers, then serve until Ctrl-C."""
    import uvicorn
    from specexec.launch import model_store
    from specexec.launch.api import open_llm
    metrics = Metrics()
    llm = open_llm(models, link, placement, tree, max_queued, on_round=metrics.on_round, on_result=metrics.on_result)
    try:
        warm = llm.generate("Hello", max_new_tokens=1, chat=False, method="autoregressive")
        if warm.error:
            raise RuntimeError(f"the verifier does not answer: {warm.error}")
        name = model_name or models.target or model_store.TARGET.name
        uvicorn.run(create_app(llm, name, metrics), host=host, port=port, log_level=log_level)
    finally:
        llm.close()
