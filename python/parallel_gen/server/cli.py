"""``parallel-gen serve``: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from ..cli.options import (ExitStatus, add_chat_template_options, add_model_options, chat_template_arg,
                           default_n_parallel, model_options)

logger = logging.getLogger("parallel_gen")


def add_parser(sub: Any) -> None:
    """Adds ``serve`` to the ``parallel-gen`` subcommands."""
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/responses, "
                                   "/v1/models (also without /v1), /health, /metrics. Every client's prompts share "
                                   "the Model's one batch.")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind, or several separated by commas, as llama-server takes them "
                        "(e.g. 127.0.0.1,::1; default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--served-model-name", "--model-alias", nargs="+", metavar="NAME", default=[],
                   help="the model's names, listed by /v1/models; answers carry the first (default: the file's stem)")
    s.add_argument("--strict-model-name", action="store_true",
                   help="refuse (404) requests naming another model (default: any name gets this model)")
    s.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN", default=[],
                   help="let web pages from these origins (https://host:port, or *) call the API (CORS; default: "
                        "none, so that no web page can drive the server)")
    s.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most sequences waiting for a slot before requests get 429 (default: 256)")
    s.add_argument("--max-n", type=int, default=16, metavar="N", help="most completions per prompt (default: 16)")
    s.add_argument("--max-prompts", type=int, default=256, metavar="N",
                   help="most prompts in one completions request (default: 256)")
    s.add_argument("--max-body", type=int, default=2 * 1024 * 1024, metavar="BYTES",
                   help="largest request body (default: 2 MiB)")
    s.add_argument("--max-open-requests", type=int, default=1024, metavar="N",
                   help="most HTTP requests handled at once; more get 503 (default: 1024)")
    k = s.add_mutually_exclusive_group()
    k.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (visible in ps: prefer "
                                                    "--api-key-file or PARALLEL_GEN_API_KEY)")
    k.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (first line)")
    k.add_argument("--api-keys", metavar="FILE",
                   help="several keys with names and limits, JSON: {\"keys\": [{\"name\": ..., \"key\" or "
                        "\"sha256\": ..., \"rpm\", \"tpm\", \"max_concurrent\", \"weight\": ...}]}; each key "
                        "has its own queue of --max-queue; reloaded on SIGHUP")
    s.add_argument("--no-fair-admission", dest="fair_admission", action="store_false",
                   help="with --api-keys: admit waiting sequences in turns across requests, not across keys")
    s.add_argument("--result-cache", metavar="DIR_OR_URL",
                   help="answer repeated deterministic (greedy or seeded) requests from a result cache: a "
                        "directory, or redis://host:port/db (shared by servers; also holds the keys' rpm/tpm "
                        "counters)")
    s.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="a stream's chunk carries its new tokens once N have come (the first token at once, the "
                        "rest at its end): less work per token with hundreds of streams (default: 1, every token)")
    s.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, seconds to let running requests finish before cancelling (default: 10)")
    r = s.add_argument_group("Ray Serve", "serve on a Ray cluster: N model replicas behind one ingress that "
                                          "routes each session to the replica holding its KV (needs "
                                          "pip install 'parallel_gen[rayserve]')")
    r.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one process")
    r.add_argument("--address", metavar="ADDR", help="Ray cluster to join (auto, ray://host:10001; default: "
                                                     "start a local one)")
    r.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="model replicas, each with --threads CPUs (default: 1; with autoscaling: the initial count)")
    r.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: fewest replicas")
    r.add_argument("--max-replicas", type=int, metavar="N", help="autoscaling: most replicas")
    r.add_argument("--target-ongoing-requests", type=float, metavar="N",
                   help="autoscaling: requests per replica to aim for (default: --n-parallel)")
    r.add_argument("--router", choices=("affinity", "default"), default="affinity",
                   help="affinity: sessions and prompt prefixes to the replica holding their KV; default: "
                        "Ray Serve's power of two choices (default: affinity)")
    add_chat_template_options(s, implies_chat=False)
    add_model_options(s, f"sequences decoded together, shared by all clients (default: {default_n_parallel(None)})")
    s.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> Optional[str]:
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it: {reason}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file's first line is empty")
        return key
    return args.api_key or os.environ.get("PARALLEL_GEN_API_KEY") or None


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The ServerSettings fields the options give."""
    return dict(served_model_names=args.served_model_name, strict_model_name=args.strict_model_name,
                allowed_origins=args.allowed_origins, max_queue=args.max_queue, max_n=args.max_n,
                max_prompts=args.max_prompts, max_body=args.max_body, max_open_requests=args.max_open_requests,
                api_key=None if args.api_keys else _api_key(args), api_keys=args.api_keys,
                fair_admission=args.fair_admission, result_cache=args.result_cache,
                chat_template=chat_template_arg(args), shutdown_grace=args.grace,
                stream_interval=args.stream_interval)


def run_on_ray(args: argparse.Namespace) -> int:
    """``serve --ray``: deploys on Ray Serve and blocks until Ctrl-C or SIGTERM."""
    try:
        from ..ray import serve
        from ..ray.serving import serve_until_stopped
    except ImportError as e:
        raise ImportError(f"parallel-gen serve --ray needs Ray Serve: pip install 'parallel_gen[rayserve]' ({e})")
    if "," in args.host:
        raise ValueError(f"--host {args.host}: --ray serves on one address (Serve's HTTP proxy)")
    app = serve(args.model, address=args.address, replicas=args.replicas, min_replicas=args.min_replicas,
                max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                router=args.router, host=args.host, port=args.port, model_options=model_options(args, None),
                **_settings(args))
    print(f"parallel-gen serve: serving on Ray Serve at {app.url} (Ctrl-C stops)", file=sys.stderr)
    serve_until_stopped(app)
    return ExitStatus.OK


def run(args: argparse.Namespace) -> int:
    if args.ray:
        return run_on_ray(args)
    for flag in ("address", "min_replicas", "max_replicas", "target_ongoing_requests"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for --ray")
    try:
        import uvicorn

        from .app import create_app
        from .uvicorn_server import LifecycleServer
    except ImportError as e:
        raise ImportError(f"parallel-gen serve needs the server extra: pip install 'parallel_gen[serve]' ({e})")
    from ..model import Model
    from ..model_files import default_model_path

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in [0, 65535]")
    if args.grace < 0:
        raise ValueError(f"--grace {args.grace}: must be >= 0")
    kwargs = model_options(args, None)
    path = args.model or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(2, "model file not found", path)
    settings = _settings(args)
    key = settings["api_key"]
    hosts = [h.strip() for h in args.host.split(",")]
    if not all(hosts):
        raise ValueError(f"--host {args.host!r}: an empty address in the list")
    for host in hosts:
        if host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("serving on %s: reachable from other machines%s", host,
                           "" if key or args.api_keys else ", with no API key (--api-key-file)")
    # Several addresses: uvicorn binds one, so bind them all here (one port for all).
    sockets = bind_all(hosts, args.port) if len(hosts) > 1 else None
    app = create_app(lambda: Model(path, **kwargs), **settings)
    life = app.state.lifecycle
    if args.api_keys:
        # Reads the file again without stopping: requests in flight keep their admission.
        signal.signal(signal.SIGHUP, lambda *_: app.state.gateway.reload())
    config = uvicorn.Config(app, host=hosts[0], port=args.port, log_level="info" if args.verbose else "warning",
                            # a little longer than the streams' grace, so they end first
                            timeout_graceful_shutdown=args.grace + 1, access_log=bool(args.verbose))
    server = LifecycleServer(config, life)
    failed = []

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    life.on_load_error = load_failed
    server.run(sockets=sockets)
    if failed:
        print(f"parallel-gen serve: error: the model failed to load: {failed[0]}", file=sys.stderr)
        return ExitStatus.FAILED
    return ExitStatus.OK


def bind_all(hosts: List[str], port: int) -> List[socket.socket]:
    """Listening sockets on every address of ``hosts`` and one port (port 0: the one the
    first address gets). OSError names the address that cannot be bound."""
    sockets: List[socket.socket] = []
    try:
        for host in hosts:
            try:
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
                sock = socket.socket(info[0], socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if info[0] == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # ::1 beside 127.0.0.1
                sock.bind(info[4][:2] if info[0] == socket.AF_INET else info[4])
            except OSError as e:
                raise OSError(e.errno, f"--host {host}: cannot bind port {port}: {e.strerror or e}") from None
            port = sock.getsockname()[1]
            sock.listen(2048)
            sock.set_inheritable(True)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
