"""The ASGI app: routes, lifecycle, request ids, key check and body limit.

Every request's prompts join the Model's one running batch (its engine thread), so
concurrent clients share decode steps; see :mod:`.service` for admission and running.
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import GenerationError
from ..model import Model
from ..results import TokenLogprobs
from ..runner import EngineStats
from .errors import APIError, install_handlers
from .metrics import Metrics
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, CompletionResponse, DeltaMessage, ModelCard, ModelList,
                       PromptTokensDetails, TokenLogprob, TopLogprob, Usage)
from .service import Choice, ClientGone, Job, Service, failed_choice
from .settings import ServerSettings

logger = logging.getLogger("parallel_gen")

ModelSource = Union[Model, Callable[[], Model]]


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    SHUTTING_DOWN = "shutting_down"


class Lifecycle:
    """The server's phase, and its Model once loaded. /health reports it."""

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.service: Optional[Service] = None
        self.error: Optional[str] = None
        self.on_load_error: Optional[Callable[[BaseException], None]] = None

    def shutting_down(self) -> None:
        self.phase = Phase.SHUTTING_DOWN

    def ready(self) -> Service:
        """The Service, or a 503 saying why there is none."""
        if self.phase is Phase.READY and self.service is not None:
            return self.service
        if self.phase is Phase.LOADING:
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           headers={"Retry-After": "1"})
        if self.phase is Phase.FAILED:
            raise APIError(503, f"the model failed to load: {self.error}", code="load_failed")
        raise APIError(503, "the server is shutting down", code="shutting_down")


def create_app(model: ModelSource, *, close_model: Optional[bool] = None, **settings: Any) -> FastAPI:
    """An OpenAI-compatible ASGI app serving ``model``.

    Args:
        model: a loaded :class:`~parallel_gen.Model`, or a function that loads one: it is
            then called on a thread at startup, and ``/health`` answers 503 until it returns.
        close_model: close the Model at shutdown (default: only a Model this app loaded).
        **settings: :class:`ServerSettings` fields (``max_queue``, ``api_key``, ...).

    Returns:
        A FastAPI app; run it with any ASGI server (``parallel-gen serve`` uses uvicorn).
    """
    config = ServerSettings(**settings)
    life = Lifecycle()
    owns = close_model if close_model is not None else not isinstance(model, Model)
    holder: Dict[str, Model] = {}

    def stats() -> Optional[EngineStats]:
        m = holder.get("model")
        return None if m is None or m.closed else m.stats()

    metrics = Metrics(stats)

    def install(m: Model) -> None:
        holder["model"] = m
        life.service = Service(m, config, metrics)
        life.phase = Phase.READY
        logger.info("serving %s as %r: n_parallel=%d, n_ctx=%d, max_queue=%d", m.path, alias(), m.n_parallel,
                    m.n_ctx, config.max_queue)

    def load() -> None:
        try:
            install(model())  # type: ignore[operator]
        except BaseException as e:
            life.error = f"{type(e).__name__}: {e}"
            life.phase = Phase.FAILED
            logger.error("the model failed to load: %s", life.error)
            if life.on_load_error is not None:
                life.on_load_error(e)

    def alias() -> str:
        if config.model_alias:
            return config.model_alias
        m = holder.get("model")
        return os.path.splitext(os.path.basename(m.path))[0] if m is not None else "model"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(model, Model):
            install(model)
        else:
            threading.Thread(target=load, name="parallel_gen-load", daemon=True).start()
        yield
        life.shutting_down()
        m = holder.get("model")
        if owns and m is not None:
            m.close()  # cancels whatever is still running

    app = FastAPI(title="parallel_gen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lifecycle = life
    app.state.metrics = metrics
    install_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_body=config.max_body)
    app.add_middleware(OpenRequestLimit, limit=config.max_open_requests)
    app.add_middleware(RequestId)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != alias():
            raise APIError(404, f"model {name!r} does not exist; this server serves {alias()!r}",
                           param="model", code="model_not_found")

    keyed = [Depends(check_key)]

    @app.get("/health")
    def health() -> JSONResponse:
        life.ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=keyed)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=keyed)
    def models() -> Dict[str, Any]:
        life.ready()
        return ModelList(data=[ModelCard(id=alias(), created=int(time.time()))]).model_dump()

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        svc = life.ready()
        check_model(body.model)
        job = await svc.completion_job(request.state.request_id, body)
        return await _respond(svc, job, request, body.stream, _include_usage(body), alias(), _CompletionShape())

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        svc = life.ready()
        check_model(body.model)
        job = await svc.chat_job(request.state.request_id, body)
        return await _respond(svc, job, request, body.stream, _include_usage(body), alias(), _ChatShape())

    return app


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options is not None and body.stream_options.include_usage)


async def _respond(svc: Service, job: Job, request: Request, stream: bool, include_usage: bool, model: str,
                   shape: "_Shape") -> Any:
    logger.info("request %s: %s, %d prompts x n=%d, %s", job.id, job.endpoint, len(job.prompts), job.n,
                "streaming" if stream else "whole")
    release = svc.admit(job)  # 429 here, before any byte of the response
    if stream:
        events = _sse(svc, job, include_usage, model, shape, release)
        # A client that leaves before the first event means the generator never starts, and
        # so never reaches its `finally`: release the admission when it is collected too.
        weakref.finalize(events, release)
        return EventSourceResponse(events, sep="\n", ping=15, shutdown_grace_period=svc.settings.shutdown_grace)
    status = 200
    try:
        await svc.collect(job, request)
        choices = [job.choices[k] for k in sorted(job.choices)]
        return JSONResponse(shape.response(job, model, choices, _usage(job)).model_dump())
    except ClientGone:
        status = 499  # nginx's "client closed request": nobody reads this response
        logger.info("request %s: client disconnected; its sequences were cancelled", job.id)
        return Response(status_code=status)
    except APIError as e:
        status = e.status
        raise
    except GenerationError as e:
        status = 500
        raise APIError(500, f"the engine failed: {e}; the server keeps serving", code="engine_failure") from None
    finally:
        release()
        svc.finish(job, status)


async def _sse(svc: Service, job: Job, include_usage: bool, model: str, shape: "_Shape",
               release: Callable[[], None]) -> AsyncIterator[Dict[str, str]]:
    status = 200
    try:
        try:
            async for c, ev in svc.events(job):
                if ev.finished and ev.finish_reason == "error":
                    raise failed_choice(c)
                for chunk in shape.chunks(job, model, c, ev):
                    yield {"data": chunk}
        except APIError as e:
            status = e.status
            yield {"data": _json(e.body())}
        except GenerationError as e:
            status = 500
            yield {"data": _json(APIError(500, f"the engine failed: {e}", code="engine_failure").body())}
        else:
            if include_usage:
                yield {"data": shape.usage_chunk(job, model, _usage(job))}
        yield {"data": "[DONE]"}
    except BaseException:
        status = 499  # cancelled: the client went away, or the server is shutting down
        raise
    finally:
        release()
        svc.finish(job, status)


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _usage(job: Job) -> Usage:
    p, c = job.usage_prompt_tokens, job.usage_completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=job.usage_cached_tokens))


class _Shape:
    """How one endpoint writes choices, chunks and usage."""

    def response(self, job: Job, model: str, choices: List[Choice], usage: Usage) -> Any:
        raise NotImplementedError

    def chunks(self, job: Job, model: str, c: Choice, ev: Any) -> List[str]:
        raise NotImplementedError

    def usage_chunk(self, job: Job, model: str, usage: Usage) -> str:
        raise NotImplementedError


class _CompletionShape(_Shape):
    @staticmethod
    def _logprobs(logprobs: Optional[List[TokenLogprobs]], offset: int = 0) -> Optional[CompletionLogprobs]:
        """``offset``: the text offset of the first token (a chunk's: the tokens' before it)."""
        if logprobs is None:
            return None
        out = CompletionLogprobs()
        for t in logprobs:
            out.tokens.append(t.token)
            out.token_logprobs.append(t.logprob)
            out.top_logprobs.append({a.token: a.logprob for a in t.top})
            out.text_offset.append(offset)
            offset += len(t.token)
        return out

    def response(self, job: Job, model: str, choices: List[Choice], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=f"cmpl-{job.id}", model=model, usage=usage, choices=[
            CompletionChoice(index=c.index, text="".join(c.text), logprobs=self._logprobs(c.logprobs),
                             finish_reason=c.finish_reason) for c in choices])

    def chunks(self, job: Job, model: str, c: Choice, ev: Any) -> List[str]:
        if not ev.text and not ev.finished and not ev.logprobs:
            return []
        logprobs = None
        if ev.logprobs is not None:
            before = c.logprobs[:len(c.logprobs) - len(ev.logprobs)]  # c.logprobs already has this event's
            logprobs = self._logprobs(ev.logprobs, sum(len(t.token) for t in before))
        choice = CompletionChoice(index=c.index, text=ev.text, finish_reason=ev.finish_reason if ev.finished else None,
                                  logprobs=logprobs)
        return [CompletionResponse(id=f"cmpl-{job.id}", created=int(job.created), model=model,
                                   choices=[choice]).model_dump_json()]

    def usage_chunk(self, job: Job, model: str, usage: Usage) -> str:
        return CompletionResponse(id=f"cmpl-{job.id}", created=int(job.created), model=model, choices=[],
                                  usage=usage).model_dump_json()


class _ChatShape(_Shape):
    @staticmethod
    def _logprobs(logprobs: Optional[List[TokenLogprobs]]) -> Optional[ChoiceLogprobs]:
        if logprobs is None:
            return None
        return ChoiceLogprobs(content=[
            TokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode("utf-8")),
                         top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.token.encode("utf-8")))
                                       for a in t.top]) for t in logprobs])

    def response(self, job: Job, model: str, choices: List[Choice], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=f"chatcmpl-{job.id}", model=model, usage=usage, choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)), logprobs=self._logprobs(c.logprobs),
                       finish_reason=c.finish_reason) for c in choices])

    def chunks(self, job: Job, model: str, c: Choice, ev: Any) -> List[str]:
        def chunk(delta: DeltaMessage, finish: Optional[str] = None,
                  logprobs: Optional[ChoiceLogprobs] = None) -> str:
            return ChatCompletionChunk(id=f"chatcmpl-{job.id}", created=int(job.created), model=model, choices=[
                ChatChunkChoice(index=c.index, delta=delta, finish_reason=finish, logprobs=logprobs)]).model_dump_json()

        out = []
        first = len(c.text) == 1  # this event's text is the choice's first
        if ev.text or first or ev.logprobs:
            out.append(chunk(DeltaMessage(role="assistant" if first else None, content=ev.text),
                             logprobs=self._logprobs(ev.logprobs) if ev.logprobs else None))
        if ev.finished:
            out.append(chunk(DeltaMessage(), ev.finish_reason))
        return out

    def usage_chunk(self, job: Job, model: str, usage: Usage) -> str:
        return ChatCompletionChunk(id=f"chatcmpl-{job.id}", created=int(job.created), model=model, choices=[],
                                   usage=usage).model_dump_json()


# -- ASGI middleware (pure ASGI: Starlette's BaseHTTPMiddleware would hide disconnects) -------------
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestId:
    """Gives every request an id: the client's X-Request-Id when it is sane, else a new one;
    returned in the response's X-Request-Id header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """413 for a body over ``max_body`` bytes: from Content-Length before reading, or
    while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_body
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                             code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException passes through FastAPI's body reading to our handler.
                    raise StarletteHTTPException(413, too_large.message)
            return message

        await self.app(scope, counted, send)


class OpenRequestLimit:
    """503 for a request beyond ``limit`` handled at once: idle or slow clients cannot make
    the server hold unbounded connections' worth of state."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.open >= self.limit:
            busy = APIError(503, f"the server is handling {self.open} requests, its limit; retry shortly",
                            code="too_many_requests", headers={"Retry-After": "1"})
            return await busy.response()(scope, receive, send)
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
