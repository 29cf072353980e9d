"""Per-key request and token counters over a sliding 60-second window, and the sequences
each key has in flight (``max_concurrent``): in this process, or in Redis so that
several servers enforce one limit.

A window is a log of events (a request, or n tokens) with their times; a request is
refused while the last 60 seconds hold ``rpm`` requests, or ``tpm`` tokens or more.
Tokens are charged as they are known (prompt tokens at admission, completion tokens at
the end), so a request is judged by what the key used before it, as LiteLLM does.
A log, not fixed per-minute buckets: whether the fourth of three allowed requests passes
must not depend on a minute boundary falling between them.

In Redis, sequences in flight are leases that expire: each server renews its own every
few seconds while they run and removes them when they end, so a server that dies holds
nothing for longer than LEASE_SECONDS.

Redis unreachable or slow: the counters fall back to this process's own (warned once,
counted by the caller), and go back to Redis once it answers again.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Tuple, Union

from ..result_cache_redis import Outage, connect
from .keys import ApiKey

logger = logging.getLogger("parallel_gen")

WINDOW = 60.0
LEASE_SECONDS = 30.0
"""How long a server's hold on sequences in flight outlives its last renewal (Redis)."""


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused now, and when to try again."""

    limit: str
    """The limit reached: ``rpm``, ``tpm`` or ``max_concurrent``."""
    message: str
    retry_after: int
    """Whole seconds until the window has room again (at least 1)."""


@dataclass(frozen=True)
class Lease:
    """Sequences a key holds against its ``max_concurrent`` until :attr:`release` is called
    (once or more: the later calls do nothing)."""

    release: Callable[[], None]


def _concurrent(key: ApiKey, held: int, retry_after: int) -> Refusal:
    return Refusal("max_concurrent", f"rate limit reached for key {key.name!r}: max_concurrent="
                                     f"{key.max_concurrent} sequences in flight ({held} now)", retry_after)


def _retry(oldest: float, now: float) -> int:
    return max(1, math.ceil(oldest + WINDOW - now))


def _rpm(key: ApiKey, oldest: float, now: float) -> Refusal:
    return Refusal("rpm", f"rate limit reached for key {key.name!r}: rpm={key.rpm} requests per minute",
                   _retry(oldest, now))


def _tpm(key: ApiKey, used: int, oldest: float, now: float) -> Refusal:
    return Refusal("tpm", f"rate limit reached for key {key.name!r}: tpm={key.tpm} tokens per minute "
                          f"({used} used in the last 60 s)", _retry(oldest, now))


class MemoryCounters:
    """This process's windows and sequences in flight (one server, or the fallback while
    Redis is down). ``retry_after``: what a max_concurrent refusal tells the client."""

    def __init__(self, retry_after: int = 1) -> None:
        self._lock = threading.Lock()
        self._retry_after = retry_after
        self._requests: Dict[str, Deque[float]] = collections.defaultdict(collections.deque)
        self._tokens: Dict[str, Deque[Tuple[float, int]]] = collections.defaultdict(collections.deque)
        self._held: Dict[str, int] = collections.defaultdict(int)

    def take_request(self, key: ApiKey, sequences: int, now: float) -> Union[Refusal, Lease]:
        """Counts a request of ``sequences`` for ``key`` and holds them, unless a limit
        (max_concurrent, rpm, tpm: in that order) refuses it."""
        with self._lock:
            held = self._held[key.name]
            if key.max_concurrent is not None and held + sequences > key.max_concurrent:
                return _concurrent(key, held, self._retry_after)
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
            self._held[key.name] = held + sequences
        return Lease(_once(lambda: self._let_go(key.name, sequences)))

    def _let_go(self, name: str, sequences: int) -> None:
        with self._lock:
            self._held[name] -= sequences

    def add_tokens(self, key: ApiKey, n: int, now: float) -> None:
        if n > 0:
            with self._lock:
                self._tokens[key.name].append((now, n))


def _once(f: Callable[[], None]) -> Callable[[], None]:
    gate = threading.Lock()

    def call() -> None:
        if gate.acquire(blocking=False):  # the first call, on whichever thread, takes it for good
            f()

    return call


# One atomic step: drop what left the window and the leases that expired, check the
# three limits, count the request and hold its sequences.
# KEYS: requests log, tokens log, leases. ARGV: now, window, rpm (-1: none), tpm (-1: none),
# request member, max_concurrent (-1: none), lease member, lease expiry.
# Token and lease members are "<n>:<unique>", so the sums need no second structure.
_TAKE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, mc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local function total(entries)
  local n = 0
  for i = 1, #entries, 2 do
    n = n + tonumber(string.match(entries[i], '^(%d+):'))
  end
  return n
end
if mc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local held = total(redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES'))
  if held + tonumber(string.match(ARGV[7], '^(%d+):')) > mc then
    return {3, held, '0'}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  return {1, 0, redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]}
end
if tpm >= 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = total(entries)
  if used >= tpm then
    return {2, used, entries[2]}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
if mc >= 0 then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[8]), ARGV[7])
  redis.call('PEXPIREAT', KEYS[3], math.ceil(tonumber(ARGV[8]) * 1000))
end
return {0, 0, '0'}
"""


class RedisCounters:
    """The windows and the leases on sequences in flight in Redis (sorted sets per key
    name), shared by every server using it.

    Redis errors switch to ``fallback`` for a few seconds, so a dead Redis costs one
    timeout now and then, not one per request.
    """

    def __init__(self, url: str, on_error: Callable[[], None], prefix: str = "parallel_gen:limits", *,
                 retry_after: int = 1, lease_seconds: float = LEASE_SECONDS) -> None:
        self._redis = connect(url)
        self._prefix = prefix
        self._take = self._redis.register_script(_TAKE)
        self._on_error = on_error
        self._outage = Outage("rate limits", url)
        self._retry_after = retry_after
        self._lease_seconds = lease_seconds
        self.fallback = MemoryCounters(retry_after)
        # Token charges, lease renewals and releases are written off the event loop (a slow
        # Redis must not stall it), one at a time: a release is never overtaken by a renewal.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="parallel_gen-limits")
        self._leases: Dict[str, str] = {}  # lease member -> its sorted set, for the renewals
        self._leases_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew_every, name="parallel_gen-leases", daemon=True)
        self._renewer.start()

    def _keys(self, key: ApiKey) -> Tuple[str, str, str]:
        base = f"{self._prefix}:{key.name}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:leases"

    def _up(self) -> bool:
        return self._outage.up()

    def _failed(self, e: Exception) -> None:
        self._outage.failed(e)
        self._on_error()

    def take_request(self, key: ApiKey, sequences: int, now: float) -> Union[Refusal, Lease]:
        if self._up():
            keys = self._keys(key)
            lease = f"{sequences}:{uuid.uuid4().hex}"
            try:
                verdict, used, oldest = self._take(keys=list(keys), args=[
                    now, WINDOW, -1 if key.rpm is None else key.rpm, -1 if key.tpm is None else key.tpm,
                    uuid.uuid4().hex, -1 if key.max_concurrent is None else key.max_concurrent, lease,
                    now + self._lease_seconds])
            except Exception as e:  # redis.RedisError, and a socket timeout under it
                self._failed(e)
            else:
                self._outage.recovered()
                if verdict == 1:
                    return _rpm(key, float(oldest), now)
                if verdict == 2:
                    return _tpm(key, int(used), float(oldest), now)
                if verdict == 3:
                    return _concurrent(key, int(used), self._retry_after)
                if key.max_concurrent is None:
                    return Lease(lambda: None)  # nothing held in Redis
                with self._leases_lock:
                    self._leases[lease] = keys[2]
                return Lease(_once(lambda: self._let_go(lease)))
        return self.fallback.take_request(key, sequences, now)

    def _let_go(self, lease: str) -> None:
        with self._leases_lock:
            leases = self._leases.pop(lease, None)
        if leases is None or self._closed.is_set():
            return

        def write() -> None:
            try:
                self._redis.zrem(leases, lease)
            except Exception as e:  # the lease expires by itself
                self._failed(e)

        self._writer.submit(write)

    def _renew_every(self) -> None:
        while not self._closed.wait(self._lease_seconds / 3):
            self._writer.submit(self._renew)

    def _renew(self) -> None:
        """Pushes back the expiry of every lease this process holds (on the writer)."""
        with self._leases_lock:
            leases = list(self._leases.items())
        if not leases or not self._up():
            return
        expiry = time.time() + self._lease_seconds
        try:
            pipe = self._redis.pipeline()
            for lease, key in leases:
                pipe.zadd(key, {lease: expiry})
                pipe.pexpireat(key, math.ceil(expiry * 1000))
            pipe.execute()
        except Exception as e:
            self._failed(e)

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
        """Stops renewing; leases still held are removed by their releases or expire."""
        self._closed.set()
        self._renewer.join()
        self._writer.shutdown(wait=True)
        self._redis.close()
