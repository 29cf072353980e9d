"""The app's ASGI middleware: request ids, the body limit, the open-request limit, CORS.

Pure ASGI (Starlette's BaseHTTPMiddleware would hide client disconnects from the routes).
"""

from __future__ import annotations

import re
import uuid
from typing import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

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


def add_cors(app: Starlette, origins: Sequence[str]) -> None:
    """Lets browser pages served from ``origins`` call the API: Starlette's CORSMiddleware
    answers their preflights and adds the headers that let them read responses (errors
    and our ids included). No cookies are involved (the key is a bearer token), so no
    credentials mode."""
    app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"], allow_credentials=False)
