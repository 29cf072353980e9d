"""Many users on one server: who is calling (API keys), how much they may use (rpm, tpm,
sequences in flight, their own queue bound), their share of the slots, and per-key
metrics. The one place these policies live; app.py asks it at the key check and at
admission.

Fair admission itself happens in the engine runner (runner.Share): each request carries
its key's name and weight, and the runner hands waiting sequences to free slots in
weighted turns across keys.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Optional, Union

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request

from ..core.runner import Share
from .errors import APIError
from .keys import ApiKey, KeyTable
from .limits import Lease, MemoryCounters, RedisCounters, Refusal

logger = logging.getLogger("parallel_gen")

_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class KeyMetrics:
    """Per key name (never the key): requests, tokens, refusals, queue wait."""

    def __init__(self, r: CollectorRegistry) -> None:
        p = "parallel_gen_key_"
        self.requests = Counter(p + "requests", "Requests admitted and finished, by key name", ["key"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests, by key name",
                                     ["key"], registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "Completion tokens of finished requests, by key "
                                                                  "name", ["key"], registry=r)
        self.refused = Counter(p + "rate_limited", "Requests refused with 429, by key name and the limit reached "
                                                   "(rpm, tpm, max_concurrent, queue)", ["key", "limit"], registry=r)
        self.in_flight = Gauge(p + "sequences_in_flight", "Sequences admitted and not finished, by key name",
                               ["key"], registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Admission to the first generated token, by key name",
                                    ["key"], buckets=_WAIT_BUCKETS, registry=r)
        self.limit_store_errors = Counter("parallel_gen_limits_redis_errors", "Rate-limit counter updates Redis "
                                          "failed (counted in this process meanwhile)", registry=r)


class Gateway:
    """Authentication, per-key limits and accounting for a server with API keys.

    ``keys``: a keys file (reloaded by :meth:`reload`) or a ready KeyTable (``--api-key``).
    ``redis_url``: where the rpm/tpm windows and the sequences in flight (max_concurrent)
    are counted, for every server using it (None: in this process).
    """

    def __init__(self, keys: Union[str, KeyTable], registry: CollectorRegistry, *, max_queue: int,
                 retry_after: int = 1, fair: bool = True, redis_url: Optional[str] = None) -> None:
        self.keys_file = keys if isinstance(keys, str) else None
        self.table = KeyTable.load(keys) if isinstance(keys, str) else keys
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.fair = fair
        self.metrics = KeyMetrics(registry)
        self.counters: Union[MemoryCounters, RedisCounters] = (
            RedisCounters(redis_url, self.metrics.limit_store_errors.inc, retry_after=retry_after) if redis_url
            else MemoryCounters(retry_after))
        self.in_flight: Dict[str, int] = {}  # sequences per key name in this process (event loop only)
        self._reload_lock = threading.Lock()
        self.on_reload: Callable[[], None] = lambda: None

    def reload(self) -> bool:
        """Reads the keys file again (SIGHUP). A bad file keeps the old keys (logged). Requests
        in flight keep the entry they were admitted with; their counts stay by name."""
        if self.keys_file is None:
            return False
        with self._reload_lock:
            try:
                table = KeyTable.load(self.keys_file)
            except ValueError as e:
                logger.error("API keys not reloaded, the old ones stay in force: %s", e)
                return False
            self.table = table  # one reference swap: a request sees the old table or the new
            self.on_reload()
        logger.warning("API keys reloaded from %s: %d keys (%s)", self.keys_file, len(table.keys),
                       ", ".join(table.names))
        return True

    # -- the key check (every route but /health) --------------------------------------------
    def authenticate(self, request: Request) -> ApiKey:
        """The caller's key entry, from ``Authorization: Bearer <key>`` or ``X-Api-Key``; 401 else."""
        auth = request.headers.get("authorization")
        presented: Optional[str] = None
        if auth is not None:
            scheme, _, given = auth.partition(" ")
            if scheme.lower() == "bearer" and given.strip():
                presented = given.strip()
        if presented is None:
            presented = request.headers.get("x-api-key", "").strip() or None
        if presented is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'",
                           code="invalid_api_key")
        key = self.table.find(presented)
        if key is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        request.state.api_key = key
        return key

    # -- admission ----------------------------------------------------------------------------
    async def admit(self, key: ApiKey, sequences: int, n_parallel: int) -> Callable[[], None]:
        """Holds ``sequences`` for ``key`` against its queue bound in this server, then its
        max_concurrent (across servers, with Redis) and its rpm/tpm windows (429 with
        Retry-After when one refuses); returns the function that lets the sequences go."""
        bound = n_parallel + self.max_queue
        if sequences > bound or (key.max_concurrent is not None and sequences > key.max_concurrent):
            limit = f"max_concurrent={key.max_concurrent}" if sequences <= bound else f"its limit of {bound}"
            raise APIError(400, f"{sequences} sequences (prompts x n) in one request: more than key {key.name!r} "
                                f"may ever have in flight ({limit}); split the request", param="n",
                           code="invalid_value")
        held = self.in_flight.get(key.name, 0)
        if held + sequences > bound:
            self.metrics.refused.labels(key.name, "queue").inc()
            raise APIError(429, f"key {key.name!r} has {held} sequences in flight, its limit of {bound} "
                                f"({n_parallel} slots + max_queue {self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        # Redis may be slow: not on the event loop. One atomic step, so a refused request
        # uses up none of the key's rpm and holds nothing.
        taken = await anyio.to_thread.run_sync(self.counters.take_request, key, sequences, time.time())
        if isinstance(taken, Refusal):
            self._refuse(key, taken)
        lease: Lease = taken
        self.in_flight[key.name] = self.in_flight.get(key.name, 0) + sequences
        self.metrics.in_flight.labels(key.name).inc(sequences)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                lease.release()
                self.in_flight[key.name] -= sequences
                self.metrics.in_flight.labels(key.name).dec(sequences)

        return release

    def _refuse(self, key: ApiKey, refusal: Refusal) -> None:
        self.metrics.refused.labels(key.name, refusal.limit).inc()
        raise APIError(429, refusal.message, code="rate_limit_exceeded",
                       headers={"Retry-After": str(refusal.retry_after)})

    def share(self, key: ApiKey) -> Optional[Share]:
        """The runner's turn group for this key's sequences (None: first come, first served)."""
        return Share(key.name, key.weight) if self.fair and len(self.table.keys) > 1 else None

    def finished(self, key: ApiKey, prompt_tokens: int, completion_tokens: int, queue_wait: Optional[float]) -> None:
        """Charges a finished (or failed, or cancelled) request to its key."""
        m = self.metrics
        m.requests.labels(key.name).inc()
        m.prompt_tokens.labels(key.name).inc(prompt_tokens)
        m.completion_tokens.labels(key.name).inc(completion_tokens)
        if queue_wait is not None:
            m.queue_wait.labels(key.name).observe(max(0.0, queue_wait))
        self.counters.add_tokens(key, prompt_tokens + completion_tokens, time.time())

    def close(self) -> None:
        if isinstance(self.counters, RedisCounters):
            self.counters.close()
