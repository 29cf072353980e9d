"""One error shape for every failure: OpenAI's ``{"error": {message, type, param, code}}``.

Every path that can fail raises :class:`APIError` (or lets a framework error through to
the handlers installed by :func:`install_handlers`), so no response ever carries
FastAPI's ``{"detail": ...}``, a 422, or a traceback.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ErrorCode, Failure
from .protocol import ErrorInfo, ErrorResponse

if TYPE_CHECKING:
    from .metrics import Metrics

logger = logging.getLogger("parallel_gen")

# OpenAI's error types, by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error response: the HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        info = ErrorInfo(message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param,
                         code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def renamed(self, names: Dict[str, str]) -> "APIError":
        """This error for a request that was converted from another one whose fields had
        other names (``names``: this request's field -> that one's): the param, and the
        message's leading field name (messages start with the field they are about)."""
        for old, new in names.items():
            p = self.param
            if p is not None and (p == old or p.startswith((old + ".", old + "["))):
                param = new + p[len(old):]
                message = param + self.message[len(p):] if self.message.startswith(p) else self.message
                return APIError(self.status, message, param=param, code=self.code, headers=self.headers)
        return self


# The one table from a prompt's ErrorCode to the HTTP status and OpenAI error code.
_STATUS: Dict[ErrorCode, Tuple[int, str]] = {
    ErrorCode.EMPTY_PROMPT: (400, "invalid_value"),
    ErrorCode.PROMPT_TOO_LONG: (400, "context_length_exceeded"),
    ErrorCode.INVALID_PROMPT: (400, "invalid_value"),
    ErrorCode.INVALID_PARAM: (400, "invalid_value"),
    ErrorCode.INVALID_INPUT: (400, "invalid_value"),
    ErrorCode.NO_KV_ROOM: (400, "context_length_exceeded"),  # never fits this server's KV pool
    ErrorCode.ABORTED: (500, "engine_failure"),
}


def failure_error(failure: Failure, param: Optional[str] = None) -> APIError:
    """The error response of a prompt that cannot run or did not finish."""
    status, code = _STATUS[failure.code]
    message = failure.message if status < 500 else f"generation failed: {failure.message}"
    return APIError(status, message, param=param, code=code)


def invalid_value(e: Exception, param: Optional[str] = None) -> APIError:
    """A 400 for a ValueError/TypeError raised by SamplingParams or the Model's checks,
    whose message names the value and whose ``field`` attribute (ParamError) names the field."""
    field = getattr(e, "field", None)
    return APIError(400, str(e).replace("SamplingParams.", ""), param=param or field, code="invalid_value")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|function-[a-z-]+|[a-z-]+\[.*\])$")


_VALUE_ERROR = re.compile(r"^Value error, ")  # pydantic's prefix for a validator's own message


def _field_names(loc: Any) -> List[str]:
    """``['prompt', '[3]']`` for pydantic's ``('body', 'prompt', 'list[str]', 3)``: the
    request's field, without the union member that was being tried."""
    parts = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif not (_TYPE_TAG.match(str(p)) or str(p)[:1].isupper()):  # not a union member (a type or model name)
            parts.append(str(p))
    return parts


def _field_path(loc: Any) -> str:
    parts = _field_names(loc)
    return "".join(p if p.startswith("[") or i == 0 else "." + p for i, p in enumerate(parts)) or "body"


def _validation_message(exc: RequestValidationError) -> APIError:
    # Report the deepest error: for a union, the member that matched what was sent
    # (input[0].role, not "input should be a string" for a list).
    errors = sorted(exc.errors(), key=lambda e: -len(_field_names(e.get("loc", ()))))
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json")
    where = _field_path(first.get("loc", ()))
    if first.get("type") == "missing":
        return APIError(400, f"{where}: required field missing", param=where, code="missing_field")
    # A union reports one error per member it tried: say them together.
    same = [e for e in errors if _field_path(e.get("loc", ())) == where]
    wants = " or ".join(dict.fromkeys(_VALUE_ERROR.sub("", e.get("msg", "invalid")) for e in same))
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    more = len(errors) - len(same)
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return APIError(400, f"{where}={shown}: {wants}{tail}", param=where,
                    code="invalid_type" if "type" in str(first.get("type", "")) else "invalid_value")


def install_handlers(app: FastAPI, metrics: "Metrics") -> None:
    """Routes every exception to the OpenAI error shape, counting and logging refusals."""

    def refuse(request: Request, err: APIError) -> JSONResponse:
        metrics.rejected.labels(err.code or str(err.status)).inc()
        logger.info("request %s: %d %s: %s", getattr(request.state, "request_id", "?"), err.status, err.code,
                    err.message)
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return refuse(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refuse(request, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), code="body_too_large" if exc.status_code == 413 else None)
        return refuse(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "?")
        logger.exception("request %s: internal error", rid)
        return APIError(500, f"internal server error (request {rid}); the server keeps serving",
                        code="internal_error").response()
