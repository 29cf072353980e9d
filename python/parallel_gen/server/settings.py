"""ServerSettings: the server's limits and identity, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ServerSettings:
    """How the server admits and answers requests (every field has a sound default)."""

    model_alias: Optional[str] = None
    """The model name clients use (``GET /v1/models``; a request naming another model
    gets a 404). None: the model file's stem."""

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
    """When set, every route but ``/health`` needs ``Authorization: Bearer <key>``."""

    chat_template: Optional[str] = None
    """Chat template for a model without one (Jinja text or a llama.cpp built-in name)."""

    retry_after: int = 1
    """Seconds a 429 response's Retry-After header asks the client to wait."""

    shutdown_grace: float = 10.0
    """On shutdown, seconds a running stream may go on before it is cancelled (whole
    responses get the ASGI server's graceful-shutdown timeout)."""

    def __post_init__(self) -> None:
        for name, low in (("max_queue", 0), ("max_n", 1), ("max_prompts", 1), ("max_body", 1024),
                          ("max_open_requests", 1), ("retry_after", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ServerSettings.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"ServerSettings.{name}={value!r}: must be >= {low}")
        if isinstance(self.shutdown_grace, bool) or not isinstance(self.shutdown_grace, (int, float)) \
                or not self.shutdown_grace >= 0:
            raise ValueError(f"ServerSettings.shutdown_grace={self.shutdown_grace!r}: must be a number >= 0")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("ServerSettings.api_key must be a non-empty str (or None for no key)")
        if self.model_alias is not None and (not isinstance(self.model_alias, str) or not self.model_alias):
            raise ValueError(f"ServerSettings.model_alias={self.model_alias!r}: must be a non-empty str")
