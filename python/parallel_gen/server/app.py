"""The ASGI app: routes, lifecycle, model names, the key check, and the one path every
endpoint's call runs through (whole or streamed).

Every request's prompts join the Model's one running batch (its engine thread), so
concurrent clients share decode steps; see :mod:`.service` for admission and running,
:mod:`.shapes` for how each endpoint writes its answer, :mod:`.middleware` for request
ids, limits and CORS.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import weakref
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..result_cache import ResultCache
from ..result_cache_redis import is_redis_url
from ..errors import GenerationError
from ..model import Model
from ..core.runner import EngineStats
from .errors import APIError, install_handlers
from .gateway import Gateway
from .keys import KeyTable
from .metrics import Metrics
from .middleware import BodyLimit, OpenRequestLimit, RequestId, add_cors
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, PromptTokensDetails, Usage
from .responses_protocol import FIELDS_FROM_CHAT, ResponsesRequest
from .result_cache import CachePlan, CallCache
from .service import Choice, ClientGone, Call, KeyHold, Service, failed_choice
from .settings import ServerSettings
from .shapes import ChatShape, CompletionShape, ResponsesShape, Shape

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
    gateway: Optional[Gateway] = None
    if config.api_keys is not None or config.api_key is not None:
        keys = config.api_keys if config.api_keys is not None else KeyTable.single(config.api_key)  # type: ignore
        gateway = Gateway(keys, metrics.registry, max_queue=config.max_queue, retry_after=config.retry_after,
                          fair=config.fair_admission,
                          redis_url=config.result_cache if is_redis_url(config.result_cache) else None)

    def install(m: Model) -> None:
        holder["model"] = m
        service = Service(m, config, metrics)
        if gateway is not None:
            # Each key has its own queue bound (Gateway.admit): the server's is their sum, so
            # it never refuses a key that is within its own.
            def bound() -> None:
                service.capacity = m.n_parallel + config.max_queue * len(gateway.table.keys)  # type: ignore
            bound()
            gateway.on_reload = bound
        if config.result_cache is not None:
            app.state.result_cache = CallCache(ResultCache(config.result_cache), m, metrics.registry)
        life.service = service
        life.phase = Phase.READY
        logger.info("serving %s as %s: n_parallel=%d, n_ctx=%d, max_queue=%d", m.path, ", ".join(map(repr, names())),
                    m.n_parallel, m.n_ctx, config.max_queue)

    def load() -> None:
        try:
            install(model())  # type: ignore[operator]
        except BaseException as e:
            life.error = f"{type(e).__name__}: {e}"
            life.phase = Phase.FAILED
            logger.error("the model failed to load: %s", life.error)
            if life.on_load_error is not None:
                life.on_load_error(e)

    def names() -> List[str]:
        """The served model names, the first the one answers carry."""
        if config.served_model_names:
            return list(config.served_model_names)
        m = holder.get("model")
        return [os.path.splitext(os.path.basename(m.path))[0] if m is not None else "model"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(model, Model):
            install(model)
        else:
            threading.Thread(target=load, name="parallel_gen-load", daemon=True).start()
        yield
        life.shutting_down()
        if app.state.result_cache is not None:
            app.state.result_cache.close()
        if gateway is not None:
            gateway.close()
        m = holder.get("model")
        if owns and m is not None:
            m.close()  # cancels whatever is still running

    app = FastAPI(title="parallel_gen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lifecycle = life
    app.state.metrics = metrics
    app.state.gateway = gateway
    app.state.result_cache = None  # a CallCache once the model is loaded, with --result-cache
    install_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_body=config.max_body)
    app.add_middleware(OpenRequestLimit, limit=config.max_open_requests)
    if config.allowed_origins:
        # Outside the limits and the key check: a preflight carries no key and must be answered.
        add_cors(app, config.allowed_origins)
        if "*" in config.allowed_origins and gateway is None:
            logger.warning("CORS allows every origin and there is no API key: any web page a user of this "
                           "machine opens can use this server")
    app.add_middleware(RequestId)

    def check_key(request: Request) -> None:
        if gateway is not None:
            gateway.authenticate(request)

    def unknown_model(name: str) -> APIError:
        return APIError(404, f"model {name!r} does not exist; this server serves {', '.join(map(repr, names()))}",
                        param="model", code="model_not_found")

    def check_model(name: Optional[str]) -> None:
        # Clients send whatever name they were configured with (LangChain's default is
        # gpt-3.5-turbo): one model is served, so any name gets it unless told otherwise.
        if config.strict_model_name and name is not None and name not in names():
            raise unknown_model(name)

    @app.get("/health")
    def health() -> JSONResponse:
        life.ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(check_key)])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The OpenAI routes, under /v1 and without it (clients given a base URL without /v1).
    api = APIRouter(dependencies=[Depends(check_key)])

    @api.get("/models")
    def models() -> Dict[str, Any]:
        life.ready()
        return ModelList(data=[ModelCard(id=n, created=int(time.time())) for n in names()]).model_dump()

    @api.get("/models/{model_id:path}")
    def model_card(model_id: str) -> Dict[str, Any]:
        life.ready()
        if model_id not in names():
            raise unknown_model(model_id)
        return ModelCard(id=model_id, created=int(time.time())).model_dump()

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        svc = life.ready()
        check_model(body.model)
        call = await svc.completion_call(request.state.request_id, body, _key_hold(svc, request))
        return await _respond(svc, call, request, body.stream, CompletionShape(names()[0], _include_usage(body)))

    @api.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        svc = life.ready()
        check_model(body.model)
        call = await svc.chat_call(request.state.request_id, body, _key_hold(svc, request))
        return await _respond(svc, call, request, body.stream, ChatShape(names()[0], _include_usage(body)))

    @api.post("/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        svc = life.ready()
        check_model(body.model)
        try:
            # the chat path, all of it
            call = await svc.chat_call(request.state.request_id, body.to_chat(), _key_hold(svc, request))
        except APIError as e:
            raise e.renamed(FIELDS_FROM_CHAT) from None
        call.endpoint = "responses"
        return await _respond(svc, call, request, body.stream, ResponsesShape(names()[0], body))

    app.include_router(api, prefix="/v1")
    app.include_router(api)
    return app


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options is not None and body.stream_options.include_usage)


async def _respond(svc: Service, call: Call, request: Request, stream: bool, shape: Shape) -> Any:
    logger.info("request %s: %s, %d prompts x n=%d, %s", call.id, call.endpoint, len(call.prompts), call.n,
                "streaming" if stream else "whole")
    release, plan = await _admit(svc, call, request)  # 429 here, before any byte of the response
    if stream:
        events = _sse(svc, call, shape, release, request, plan)
        # A client that leaves before the first event means the generator never starts, and
        # so never reaches its `finally`: release the admission when it is collected too.
        weakref.finalize(events, release)
        return EventSourceResponse(events, sep="\n", ping=15, shutdown_grace_period=svc.settings.shutdown_grace)
    status = 200
    try:
        await svc.collect(call, request)
        return JSONResponse(shape.response(call, _choices(call), _usage(call)).model_dump())
    except ClientGone:
        status = 499  # nginx's "client closed request": nobody reads this response
        logger.info("request %s: client disconnected; its sequences were cancelled", call.id)
        return Response(status_code=status)
    except APIError as e:
        status = e.status
        raise
    except GenerationError as e:
        status = 500
        raise APIError(500, f"the engine failed: {e}; the server keeps serving", code="engine_failure") from None
    finally:
        release()
        _finish(svc, call, status, request, plan)


def _key_hold(svc: Service, request: Request) -> Optional[KeyHold]:
    """The caller's key's admission (a keyed server), for the Service to take before it
    builds the call; None without keys."""
    gateway: Optional[Gateway] = request.app.state.gateway
    key = getattr(request.state, "api_key", None)
    if gateway is None or key is None:
        return None
    return lambda sequences: gateway.admit(key, sequences, svc.model.n_parallel)


async def _admit(svc: Service, call: Call, request: Request) -> Tuple[Callable[[], None], Optional[CachePlan]]:
    """What admission leaves after the call is built (the server's queue and the caller's
    key's limits were held before, by Service.admit: a refused request costs no rendering
    or tokenizing): the key's turn group, then the result cache (a call it answers whole
    never reaches the engine)."""
    if call.admission is None:
        raise RuntimeError(f"request {call.id}: its call was never admitted")
    release = call.admission.release  # the queue and the key's hold, however the call ends
    gateway: Optional[Gateway] = request.app.state.gateway
    key = getattr(request.state, "api_key", None)
    try:
        if gateway is not None and key is not None and call.stream is not None:
            call.stream.share = gateway.share(key)
        cache: Optional[CallCache] = request.app.state.result_cache
        plan = await cache.lookup(call) if cache is not None else None
    except BaseException:
        release()
        raise
    return release, plan


def _finish(svc: Service, call: Call, status: int, request: Request, plan: Optional[CachePlan]) -> None:
    svc.finish(call, status)
    cache: Optional[CallCache] = request.app.state.result_cache
    if status == 200 and cache is not None:
        cache.store(call, plan)
    gateway: Optional[Gateway] = request.app.state.gateway
    key = getattr(request.state, "api_key", None)
    if gateway is not None and key is not None:
        wait = call.first_token_at - call.started if call.first_token_at is not None else None
        gateway.finished(key, call.usage_prompt_tokens, call.usage_completion_tokens, wait)


async def _sse(svc: Service, call: Call, shape: Shape, release: Callable[[], None], request: Request,
               plan: Optional[CachePlan]) -> AsyncIterator[ServerSentEvent]:
    status = 200
    try:
        for event in shape.opening(call):
            yield event
        try:
            async for c, ev in svc.events(call):
                if ev.finished and ev.finish_reason == "error":
                    raise failed_choice(c)
                for event in shape.chunks(call, c, ev):
                    yield event
        except APIError as e:
            status = e.status
            for event in shape.failed(call, e):
                yield event
        except GenerationError as e:
            status = 500
            for event in shape.failed(call, APIError(500, f"the engine failed: {e}", code="engine_failure")):
                yield event
        else:
            for event in shape.closing(call, _choices(call), _usage(call)):
                yield event
    except BaseException:
        status = 499  # cancelled: the client went away, or the server is shutting down
        raise
    finally:
        release()
        _finish(svc, call, status, request, plan)


def _choices(call: Call) -> List[Choice]:
    return [call.choices[k] for k in sorted(call.choices)]


def _usage(call: Call) -> Usage:
    p, c = call.usage_prompt_tokens, call.usage_completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=call.usage_cached_tokens))
