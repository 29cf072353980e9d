"""The OpenAI server on Ray Serve: :func:`serve` (``parallel-gen serve --ray``).

Two deployments:

- ``Model``: N replicas, each one Model and the one-process server's whole app
  (:func:`parallel_gen.server.create_app`: every route, streaming, keys and limits),
  which runs the requests forwarded to it in-process and streams the response back.
- ``Ingress``: the HTTP entry. It reads a request's body, takes its routing key (session
  id, prompt text: :func:`.routing.route_key`) and forwards the request through a
  DeploymentHandle whose router (:class:`.serve_router.AffinityRouter`) picks the replica.

Why an ingress: Serve's HTTP proxy routes a request before its body is read, so a
router placed there sees headers only (Serve's ConsistentHashRouter reads
``x-session-id`` so); the body's ``user``/``prompt_cache_key`` and the prompt's prefix
are only seen by a router behind a deployment that has read the body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

import ray
from ray import serve as ray_serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..config import ModelConfig
from ..model import Model
from ..model_files import default_model_path
from ..server.app import Phase, create_app
from ..server.errors import APIError
from ..server.settings import ServerSettings
from .batch import actor_model_options, actor_resources
from .files import join_cluster
from .routing import RouteKey, route_key
from .serve_types import REPLICA_HEADER, ForwardedRequest, ResponseStart, known_replicas

logger = logging.getLogger("parallel_gen")

ROUTERS = ("affinity", "default")
"""``router=`` of :func:`serve`: this package's affinity router (:class:`.serve_router.AffinityRouter`),
or Serve's default (power of two choices: the shorter queue of two random replicas), for comparison."""

MODEL_DEPLOYMENT = "Model"


class ModelReplica:
    """One Model and the server's app; ``__call__`` runs a forwarded request through the
    app and yields the response: a :class:`ResponseStart` (with ``x-replica-id``), then
    body parts as the app sends them (an SSE stream event by event)."""

    async def __init__(self, path: str, model_options: Dict[str, Any], settings: Dict[str, Any]) -> None:
        options = {**actor_model_options(), **model_options}  # n_threads: the CPUs Serve gave this replica
        model = await asyncio.to_thread(Model, path, **options)  # a replica is ready once its model is
        self.app = create_app(model, close_model=True, **settings)
        self.replica_id = ray_serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        gateway = self.app.state.gateway
        self._keys_watch = (asyncio.ensure_future(_watch_keys(gateway))
                            if gateway is not None and gateway.keys_file is not None else None)

    def check_health(self) -> None:
        phase = self.app.state.lifecycle.phase
        if phase is not Phase.READY:
            raise RuntimeError(f"replica {self.replica_id}: the server is {phase.value}")

    async def __del__(self) -> None:
        if self._keys_watch is not None:
            self._keys_watch.cancel()
        await self._lifespan.__aexit__(None, None, None)  # closes the Model

    async def __call__(self, request: ForwardedRequest) -> AsyncIterator[Union[ResponseStart, bytes]]:
        sent: "asyncio.Queue[Optional[Dict[str, Any]]]" = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> Dict[str, Any]:
            if body:
                return body.pop()
            await gone.wait()  # the ingress's client left (this generator was closed)
            return {"type": "http.disconnect"}

        async def send(message: Dict[str, Any]) -> None:
            await sent.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode("latin-1"),
                 "root_path": "", "query_string": request.query, "headers": request.headers,
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while True:
                message = await sent.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", [])) + [(REPLICA_HEADER.encode(), self.replica_id.encode())]
                    yield ResponseStart(message["status"], headers)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
            await task  # its error, if it failed
        finally:
            gone.set()  # the app cancels the request's sequences when it sees the client leave
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=5)
                except BaseException:  # noqa: BLE001 - cancelled or failed: either way it is over
                    pass


class Ingress:
    """HTTP entry: forwards each request to a model replica chosen by the router from its
    routing key, and streams the answer back; ``/metrics`` gathers every replica's."""

    def __init__(self, model: DeploymentHandle, max_body: int) -> None:
        self.model = model.options(stream=True)
        self.max_body = max_body

    async def __call__(self, request: Request) -> Response:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body:
                break  # the replica answers 413 from the Content-Length; no need to read on
        path = request.url.path
        forwarded = ForwardedRequest(
            method=request.method, path=path, query=request.url.query.encode("latin-1"),
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            body=bytes(body),
            key=route_key(request.headers, bytes(body)) if request.method == "POST" else RouteKey())
        if request.method == "GET" and path.rstrip("/") == "/metrics":
            return await self._metrics(forwarded)
        return await self._forward(forwarded)

    async def _forward(self, request: ForwardedRequest) -> Response:
        stream = self.model.remote(request)
        try:
            start = await stream.__anext__()
        except StopAsyncIteration:
            return _unavailable("the replica closed the response before starting it")
        except Exception as e:  # noqa: BLE001 - a dead or unreachable replica: the client may retry
            return _unavailable(f"the replica serving this request failed: {type(e).__name__}")
        if not isinstance(start, ResponseStart):  # the replica's generator yields its start first
            return _unavailable(f"the replica answered {type(start).__name__} before its status")
        headers = _headers(start.headers)
        event_stream = headers.get("content-type", "").startswith("text/event-stream")

        async def parts() -> AsyncIterator[bytes]:
            try:
                async for part in stream:
                    yield part
            except Exception as e:  # noqa: BLE001 - the replica died mid-answer
                logger.warning("request to replica %s failed mid-answer: %s", headers.get(REPLICA_HEADER), e)
                if event_stream:  # end the stream with OpenAI's error object, as the app ends a failed one
                    yield _sse_error(request.path)
            finally:
                stream.cancel()  # a client that left: the replica's generator is closed, its sequences cancelled

        return StreamingResponse(parts(), status_code=start.status, headers=headers)

    async def _metrics(self, request: ForwardedRequest) -> Response:
        """Every replica's /metrics, each sample labelled with its replica."""
        texts: Dict[str, str] = {}
        replicas = known_replicas(MODEL_DEPLOYMENT) or [None]  # none known yet: ask any, which makes them known
        for rid in replicas:
            start, body = await self._whole(ForwardedRequest(**{**request.__dict__, "replica": rid}))
            if start is None:
                continue  # gone since: its figures went with it
            if start.status != 200:  # a key refused: that answer, as it is
                return Response(body, status_code=start.status, headers=_headers(start.headers))
            texts[_headers(start.headers)[REPLICA_HEADER]] = body.decode("utf-8")
        if not texts:
            return _unavailable("no model replica answered")
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _whole(self, request: ForwardedRequest) -> Tuple[Optional[ResponseStart], bytes]:
        start: Optional[ResponseStart] = None
        body = bytearray()
        try:
            async for part in self.model.remote(request):
                if isinstance(part, ResponseStart):
                    start = part
                else:
                    body += part
        except Exception:  # noqa: BLE001 - a replica that died meanwhile
            return None, b""
        return start, bytes(body)


def _headers(raw: List[Tuple[bytes, bytes]]) -> Dict[str, str]:
    # content-length stays: the body is forwarded unchanged.
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def _unavailable(why: str) -> Response:
    return APIError(503, f"{why}; retry the request (another replica will take it)", code="replica_unavailable",
                    headers={"Retry-After": "1"}).response()


def _sse_error(path: str) -> bytes:
    import json

    err = APIError(503, "the replica serving this stream failed; retry the request", code="replica_unavailable")
    data = json.dumps(err.body())
    if path.rstrip("/").endswith("/responses"):
        return f"event: error\ndata: {data}\n\n".encode()
    return f"data: {data}\n\ndata: [DONE]\n\n".encode()


def merge_metrics(texts: Mapping[str, str]) -> bytes:
    """Prometheus text from several replicas' (replica id -> text) as one exposition,
    every sample labelled ``replica``: sum or compare them by that label."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: Dict[str, Any] = {}
    for rid, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            labelled = [s._replace(labels={**s.labels, "replica": rid}) for s in family.samples]
            if merged is family:
                family.samples = labelled
            else:
                merged.samples.extend(labelled)

    class _Families:
        def collect(self) -> List[Any]:
            return list(families.values())

    return generate_latest(_Families())  # type: ignore[arg-type]


KEYS_POLL_SECONDS = 2.0


def _file_version(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def _watch_keys(gateway: Any) -> None:
    """No signal reaches a replica (SIGHUP reloads a one-process server's keys): each replica
    rereads the keys file when it changes, checked every KEYS_POLL_SECONDS (the file must be
    readable on every node, as the model is). A bad file keeps the old keys (logged)."""
    seen = _file_version(gateway.keys_file)
    while True:
        await asyncio.sleep(KEYS_POLL_SECONDS)
        now = _file_version(gateway.keys_file)
        if now is not None and now != seen:
            seen = now
            await asyncio.to_thread(gateway.reload)


@dataclass
class RayServeApp:
    """The app :func:`serve` deployed: its URL, Serve application name, and how to stop it."""

    url: str
    name: str
    started_cluster: bool

    def shutdown(self, wait: float = 60.0) -> None:
        """Deletes the application (and, when :func:`serve` started Ray here, Serve and Ray,
        then waits up to ``wait`` seconds for the HTTP port to close: Ray's proxy process
        outlives the driver's ``ray.shutdown()`` briefly, and a caller that restarts on the
        same port, or a supervisor that checks it, must find it closed)."""
        ray_serve.delete(self.name)
        if not self.started_cluster:
            return
        ray_serve.shutdown()
        ray.shutdown()
        parts = urlsplit(self.url)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parts.hostname or "", parts.hostname or "127.0.0.1")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, parts.port or 80), timeout=1).close()
            except OSError:
                return
            time.sleep(0.2)
        logger.warning("%s still accepts connections %.0f s after Ray's shutdown", self.url, wait)


def serve(model: Union[str, "os.PathLike[str]", None] = None, *, address: Optional[str] = None, replicas: int = 1,
          min_replicas: Optional[int] = None, max_replicas: Optional[int] = None,
          target_ongoing_requests: Optional[float] = None, router: str = "affinity",
          router_options: Optional[Mapping[str, Any]] = None, host: str = "127.0.0.1", port: int = 8000,
          name: str = "parallel_gen", model_options: Optional[Mapping[str, Any]] = None,
          **settings: Any) -> RayServeApp:
    """Deploys the OpenAI-compatible server on Ray Serve: ``replicas`` model replicas
    behind one ingress at ``http://host:port``; returns once every replica has loaded.

    Args:
        model: GGUF path, readable on every node (None: the default model).
        address: a Ray cluster ("auto", "ray://host:10001"); None starts a local one
            (when this process is not connected yet).
        replicas: model replicas (with autoscaling: the initial count).
        min_replicas, max_replicas: autoscaling bounds (either one turns autoscaling on).
        target_ongoing_requests: autoscaling's target requests per replica (default: the
            Model's n_parallel, its slots).
        router: "affinity" (sessions and prompt prefixes to the replica holding their KV)
            or "default" (Serve's power of two choices).
        router_options: :class:`~parallel_gen.ray.routing.AffinityPolicy` fields.
        model_options: ModelConfig fields. Each replica reserves ``n_threads`` CPUs
            (default 1) and runs that many threads, and one GPU when ``n_gpu_layers`` is set.
        **settings: :class:`~parallel_gen.server.ServerSettings` fields, for every replica
            (limits and queues are per replica; a Redis ``result_cache`` shares the keys'
            rpm/tpm counters across them).
    """
    path = os.fspath(model) if model is not None else default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(2, "model file not found", path)
    if router not in ROUTERS:
        raise ValueError(f"router={router!r}: must be one of {', '.join(map(repr, ROUTERS))}")
    for what, value in (("replicas", replicas), ("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (what != "min_replicas")):
            raise ValueError(f"{what}={value!r}: must be an int >= {int(what != 'min_replicas')}")
    if settings.get("api_keys") is not None:  # read by every replica, whatever its working directory
        settings["api_keys"] = os.path.abspath(settings["api_keys"])
    config = ServerSettings(**settings)  # bad settings fail here, not in every replica
    options = dict(model_options or {})
    cpus, gpus = actor_resources(options)
    options.pop("n_threads", None)
    n_parallel = int(options.get("n_parallel", ModelConfig.n_parallel))
    routing: Dict[str, Any] = {}  # Serve's default router
    if router == "affinity":
        from .routing import AffinityPolicy

        AffinityPolicy(**dict(router_options or {}))  # bad router options fail here
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class="parallel_gen.ray.serve_router.AffinityRouter",
            request_router_kwargs=dict(router_options or {}))
    elif router_options:
        raise ValueError("router_options are the affinity router's: not for router='default'")
    scaling: Dict[str, Any] = {"num_replicas": replicas}
    most = replicas
    if min_replicas is not None or max_replicas is not None:
        low = min_replicas if min_replicas is not None else min(1, replicas)
        high = max_replicas if max_replicas is not None else max(replicas, low, 1)
        if not low <= replicas <= high:
            raise ValueError(f"replicas={replicas} must lie within min_replicas={low} and max_replicas={high}")
        target = target_ongoing_requests if target_ongoing_requests is not None else n_parallel
        scaling = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": low, "max_replicas": high, "initial_replicas": replicas,
            "target_ongoing_requests": target}}
        most = high
    elif target_ongoing_requests is not None:
        raise ValueError("target_ongoing_requests is for autoscaling: give min_replicas or max_replicas too")

    started = join_cluster(address, cpus * most, gpus * most)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        model_deployment = ray_serve.deployment(ModelReplica).options(
            name=MODEL_DEPLOYMENT, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
            # Past its slots and queue a replica refuses, and the router tries the next choice.
            max_ongoing_requests=n_parallel + config.max_queue, **routing, **scaling)
        ingress = ray_serve.deployment(Ingress).options(
            name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=config.max_open_requests)
        app = ingress.bind(model_deployment.bind(path, options, {k: v for k, v in settings.items()}),
                           config.max_body)
        ray_serve.run(app, name=name, route_prefix="/", blocking=False)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    logger.info("serving %s on Ray Serve at %s: %s replica(s), router %s", path, url, most, router)
    return RayServeApp(url, name, started)


def serve_until_stopped(app: RayServeApp) -> None:
    """Blocks until Ctrl-C or SIGTERM, then shuts the app down and returns (the command
    exits 0, as the one-process server does): the handlers replace Ray's driver handler,
    which would exit on SIGTERM from wherever the main thread is."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        try:
            app.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
