"""The result cache's shared level: Redis, with an in-process LRU in front.

Entries are the JSON the disk cache stores, under ``parallel_gen:result:<key>``; the key
is ResultCache.key's (model fingerprint, numerics, prompt, every sampling parameter), so
any process on the same model file reads what another wrote.

Redis is a cache, never a dependency of an answer: an error or a timeout (a short one)
counts, logs one warning per outage, and the request runs uncached. After an error Redis
is left alone for a few seconds, so a dead Redis costs one timeout now and then.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

logger = logging.getLogger("parallel_gen")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_TIMEOUT = 0.25  # seconds: a lookup slower than this is worth less than decoding
_BACKOFF = 5.0


def is_redis_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(REDIS_SCHEMES)


def connect(url: str) -> Any:
    """A redis client for ``url`` with short timeouts (nothing is sent yet)."""
    try:
        import redis
    except ImportError as e:
        raise ImportError(f"a redis:// cache or limit store needs the redis client: pip install "
                          f"'parallel_gen[redis]' ({e})") from None
    return redis.Redis.from_url(url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT)


def safe_url(url: str) -> str:
    """The URL without its password, for log lines."""
    head, sep, tail = url.partition("@")
    return (head.split("://")[0] + "://***@" + tail) if sep else url


@dataclass
class CacheCounts:
    """Lookups by level since the cache opened (read by the server's /metrics)."""

    hits: Dict[str, int] = field(default_factory=lambda: {"memory": 0, "redis": 0})
    misses: int = 0
    errors: int = 0
    """Redis calls that failed or timed out (the lookup or store then went without it)."""


class Outage:
    """One warning per outage of a Redis, and the backoff after an error."""

    def __init__(self, what: str, url: str) -> None:
        self.what, self.url = what, safe_url(url)
        self._down_until = 0.0
        self._warned = False

    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, e: Exception) -> None:
        self._down_until = time.monotonic() + _BACKOFF
        if not self._warned:
            self._warned = True
            logger.warning("%s: Redis at %s failed (%s: %s); going on without it, retrying every %.0f s",
                           self.what, self.url, type(e).__name__, e, _BACKOFF)

    def recovered(self) -> None:
        if self._warned:
            self._warned = False
            logger.warning("%s: Redis at %s answers again", self.what, self.url)


class RedisStore:
    """Raw entries in an LRU of ``memory_entries`` in front of Redis (``ttl`` seconds, or none)."""

    def __init__(self, url: str, ttl: Optional[float] = None, memory_entries: int = 1024) -> None:
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ResultCache ttl={ttl!r}: must be > 0 seconds (or None: no expiry)")
        self.url = url
        self.ttl = ttl
        self._redis = connect(url)
        self._lru: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._memory_entries = memory_entries
        self._lock = threading.Lock()
        self._outage = Outage("result cache", url)
        self.counts = CacheCounts()

    def _remember(self, key: str, raw: str) -> None:
        with self._lock:
            self._lru[key] = raw
            self._lru.move_to_end(key)
            while len(self._lru) > self._memory_entries:
                self._lru.popitem(last=False)

    def _failed(self, e: Exception) -> None:
        self.counts.errors += 1
        self._outage.failed(e)

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            raw = self._lru.get(key)
            if raw is not None:
                self._lru.move_to_end(key)
                self.counts.hits["memory"] += 1
                return raw
        if self._outage.up():
            try:
                value = self._redis.get("parallel_gen:result:" + key)
            except Exception as e:  # redis.RedisError, timeouts
                self._failed(e)
            else:
                self._outage.recovered()
                if value is not None:
                    raw = value.decode("utf-8")
                    self._remember(key, raw)
                    self.counts.hits["redis"] += 1
                    return raw
        self.counts.misses += 1
        return None

    def put(self, key: str, raw: str) -> None:
        self._remember(key, raw)
        if self._outage.up():
            try:
                self._redis.set("parallel_gen:result:" + key, raw, px=int(self.ttl * 1000) if self.ttl else None)
            except Exception as e:
                self._failed(e)
            else:
                self._outage.recovered()

    def delete(self, key: str) -> None:
        with self._lock:
            self._lru.pop(key, None)
        if self._outage.up():
            try:
                self._redis.delete("parallel_gen:result:" + key)
            except Exception as e:
                self._failed(e)

    def __len__(self) -> int:
        """Entries in the memory level (Redis is shared: its size is not this cache's)."""
        return len(self._lru)

    def close(self) -> None:
        self._redis.close()
