"""Per-key request and token counters over a sliding 60-second window: in this process,
or in Redis so that several servers enforce one limit.

A window is a log of events (a request, or n tokens) with their times; a request is
refused while the last 60 seconds hold ``rpm`` requests, or ``tpm`` tokens or more.
Tokens are charged as they are known (prompt tokens at admission, completion tokens at
the end), so a request is judged by what the key used before it, as LiteLLM does.
A log, not fixed per-minute buckets: whether the fourth of three allowed requests passes
must not depend on a minute boundary falling between them.

Redis unreachable or slow: the counters fall back to this process's own (warned once,
counted by the caller), and go back to Redis once it answers again.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Tuple

from ..result_cache_redis import Outage, connect
from .keys import ApiKey

logger = logging.getLogger("parallel_gen")

WINDOW = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused now, and when to try again."""

    limit: str
    """The limit reached: ``rpm``, ``tpm`` or ``max_concurrent``."""
    message: str
    retry_after: int
    """Whole seconds until the window has room again (at least 1)."""


def _retry(oldest: float, now: float) -> int:
    return max(1, math.ceil(oldest + WINDOW - now))


def _rpm(key: ApiKey, oldest: float, now: float) -> Refusal:
    return Refusal("rpm", f"rate limit reached for key {key.name!r}: rpm={key.rpm} requests per minute",
                   _retry(oldest, now))


def _tpm(key: ApiKey, used: int, oldest: float, now: float) -> Refusal:
    return Refusal("tpm", f"rate limit reached for key {key.name!r}: tpm={key.tpm} tokens per minute "
                          f"({used} used in the last 60 s)", _retry(oldest, now))


class MemoryCounters:
    """This process's windows (one server, or the fallback while Redis is down)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Dict[str, Deque[float]] = collections.defaultdict(collections.deque)
        self._tokens: Dict[str, Deque[Tuple[float, int]]] = collections.defaultdict(collections.deque)

    def take_request(self, key: ApiKey, now: float) -> Optional[Refusal]:
        """Counts a request for ``key`` unless a limit refuses it."""
        with self._lock:
            reqs, toks = self._requests[key.name], self._tokens[key.name]
            while reqs and reqs[0] <= now - WINDOW:
                reqs.popleft()
            while toks and toks[0][0] <= now - WINDOW:
                toks.popleft()
            if key.rpm is not None and len(reqs) >= key.rpm:
                return _rpm(key, reqs[0], now)
            used = sum(n for _, n in toks)
            if key.tpm is not None and used >= key.tpm:
                return _tpm(key, used, toks[0][0], now)
            reqs.append(now)
            return None

    def add_tokens(self, key: ApiKey, n: int, now: float) -> None:
        if n > 0:
            with self._lock:
                self._tokens[key.name].append((now, n))


# One atomic step: drop what left the window, check both limits, count the request.
# KEYS: requests log, tokens log. ARGV: now, window, rpm (-1: none), tpm (-1: none), member.
# Token members are "<n>:<unique>", so the sum needs no second structure.
_TAKE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  return {1, 0, redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]}
end
if tpm >= 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do
    used = used + tonumber(string.match(entries[i], '^(%d+):'))
  end
  if used >= tpm then
    return {2, used, entries[2]}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return {0, 0, '0'}
"""


class RedisCounters:
    """The windows in Redis (sorted sets per key name), shared by every server using it.

    Redis errors switch to ``fallback`` for a few seconds, so a dead Redis costs one
    timeout now and then, not one per request.
    """

    def __init__(self, url: str, on_error: Callable[[], None], prefix: str = "parallel_gen:limits") -> None:
        self._redis = connect(url)
        self._prefix = prefix
        self._take = self._redis.register_script(_TAKE)
        self._on_error = on_error
        self._outage = Outage("rate limits", url)
        self.fallback = MemoryCounters()
        # Token charges are written off the event loop: a slow Redis must not stall it.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="parallel_gen-limits")

    def _keys(self, key: ApiKey) -> Tuple[str, str]:
        return f"{self._prefix}:{key.name}:requests", f"{self._prefix}:{key.name}:tokens"

    def _up(self) -> bool:
        return self._outage.up()

    def _failed(self, e: Exception) -> None:
        self._outage.failed(e)
        self._on_error()

    def take_request(self, key: ApiKey, now: float) -> Optional[Refusal]:
        if self._up():
            try:
                verdict, used, oldest = self._take(keys=list(self._keys(key)),
                                                   args=[now, WINDOW, key.rpm if key.rpm is not None else -1,
                                                         key.tpm if key.tpm is not None else -1, uuid.uuid4().hex])
            except Exception as e:  # redis.RedisError, and a socket timeout under it
                self._failed(e)
            else:
                self._outage.recovered()
                if verdict == 1:
                    return _rpm(key, float(oldest), now)
                if verdict == 2:
                    return _tpm(key, int(used), float(oldest), now)
                return None
        return self.fallback.take_request(key, now)

    def add_tokens(self, key: ApiKey, n: int, now: float) -> None:
        if n <= 0:
            return
        if not self._up():
            self.fallback.add_tokens(key, n, now)
            return

        def write() -> None:
            tokens = self._keys(key)[1]
            try:
                pipe = self._redis.pipeline()
                pipe.zadd(tokens, {f"{n}:{uuid.uuid4().hex}": now})
                pipe.pexpire(tokens, int(WINDOW * 1000))
                pipe.execute()
            except Exception as e:
                self._failed(e)
                self.fallback.add_tokens(key, n, now)

        self._writer.submit(write)

    def flush(self) -> None:
        """Waits for the token charges already handed to the writer (tests, shutdown)."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._redis.close()
