"""ServerSettings: the server's limits and identity, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s]+$")  # scheme://host[:port], as a browser sends Origin


@dataclass(frozen=True)
class ServerSettings:
    """How the server admits and answers requests (every field has a sound default)."""

    served_model_names: Tuple[str, ...] = ()
    """The model's names, listed by ``GET /v1/models``; answers carry the first. Empty:
    the model file's stem."""

    strict_model_name: bool = False
    """Refuse (404) a request naming another model than these names. Off: any name gets
    the one model served, as clients configured for another server expect."""

    allowed_origins: Tuple[str, ...] = ()
    """Origins (``https://app.example:8080``, or ``*``) whose web pages may call the API
    (CORS). Empty: none, so a page the user opens cannot drive this keyless local server."""

    max_queue: int = 256
    """Most sequences (prompts x n) waiting for a slot, beyond the n_parallel running
    ones. A request that would go past it gets 429 with Retry-After. The queue costs a
    few KB per waiting prompt (its text), not KV: KV is only taken in a slot."""

    max_n: int = 16
    """Most completions per prompt (``n``) in one request."""

    max_prompts: int = 256
    """Most prompts in one completions request."""

    max_open_requests: int = 1024
    """Most HTTP requests handled at once (any route, streams included); one more gets
    503 at once. With max_body, it bounds the server's memory whatever the clients do."""

    max_body: int = 2 * 1024 * 1024
    """Largest request body in bytes; a larger one gets 413 before it is parsed."""

    api_key: Optional[str] = None
    """When set, every route but ``/health`` needs ``Authorization: Bearer <key>`` (or
    ``X-Api-Key: <key>``)."""

    api_keys: Optional[str] = None
    """A keys file (see :mod:`.keys`): several keys, each with a name and its own limits,
    queue bound and share of the slots; reloaded on SIGHUP. Exclusive with api_key."""

    fair_admission: bool = True
    """With several keys: waiting sequences go to free slots in weighted turns across keys
    (off: in turns across requests, whoever sent them)."""

    result_cache: Optional[str] = None
    """A result cache for deterministic calls: a directory, or a Redis URL (which then
    also holds the keys' rpm/tpm counters, shared by every server using it)."""

    chat_template: Optional[str] = None
    """Chat template for a model without one (Jinja text or a llama.cpp built-in name)."""

    retry_after: int = 1
    """Seconds a 429 response's Retry-After header asks the client to wait."""

    shutdown_grace: float = 10.0
    """On shutdown, seconds a running stream may go on before it is cancelled (whole
    responses get the ASGI server's graceful-shutdown timeout)."""

    stream_interval: int = 1
    """A stream's chunk carries its new tokens once this many have come (its first token
    at once, the rest in its last chunk), as SGLang's ``--stream-interval``: fewer chunks,
    less event-loop work per token with hundreds of streams. 1: every token."""

    def __post_init__(self) -> None:
        for name, low in (("max_queue", 0), ("max_n", 1), ("max_prompts", 1), ("max_body", 1024),
                          ("max_open_requests", 1), ("retry_after", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ServerSettings.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"ServerSettings.{name}={value!r}: must be >= {low}")
        from ..stream import check_stream_interval

        check_stream_interval(self.stream_interval)
        if isinstance(self.shutdown_grace, bool) or not isinstance(self.shutdown_grace, (int, float)) \
                or not self.shutdown_grace >= 0:
            raise ValueError(f"ServerSettings.shutdown_grace={self.shutdown_grace!r}: must be a number >= 0")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("ServerSettings.api_key must be a non-empty str (or None for no key)")
        for name in ("served_model_names", "allowed_origins"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)) \
                    or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"ServerSettings.{name}={value!r}: must be a list of non-empty str")
            object.__setattr__(self, name, tuple(dict.fromkeys(value)))
        if self.api_key is not None and self.api_keys is not None:
            raise ValueError("ServerSettings: give api_key or api_keys, not both")
        for name in ("api_keys", "result_cache"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"ServerSettings.{name}={value!r}: must be a non-empty str (or None)")
        if not isinstance(self.strict_model_name, bool) or not isinstance(self.fair_admission, bool):
            raise TypeError(f"ServerSettings.strict_model_name={self.strict_model_name!r}, fair_admission="
                            f"{self.fair_admission!r}: must be bools")
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"ServerSettings.allowed_origins: {origin!r} is not an origin: scheme://host[:port] "
                                 "with no path (no trailing slash), or *")
