"""The server's result cache (``serve --result-cache DIR|redis://...``): a deterministic
call (greedy, or seeded) whose every prompt is in the cache is answered from it without
decoding; a call that ran is stored for the next one. The keys are ResultCache.key's,
the ones generate_parallel uses, so the server, in-process calls and other servers on the
same model file and Redis answer each other.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..result_cache import ResultCache
from ..generate import cacheable_result
from ..model import Model
from ..results import Completion, Output
from ..stream import StreamEvent
from .service import Call

logger = logging.getLogger("parallel_gen")


@dataclass(frozen=True)
class CachePlan:
    """A cacheable call's keys (one per prompt), and its cached results when all were found."""

    keys: List[str]
    found: Optional[List[Completion]]


class Replay:
    """A call's stream made of cached results: one finished event per choice."""

    def __init__(self, completions: List[Completion]) -> None:
        self._outputs = {(c.index, j): o for c in completions for j, o in enumerate(c.outputs)}
        self._events = [StreamEvent(c.index, o.text, list(o.token_ids), True, o.finish_reason, sample=j,
                                    stop_reason=o.stop_reason, logprobs=o.logprobs, cached_tokens=c.prompt_tokens)
                        for c in completions for j, o in enumerate(c.outputs)]

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        if not self._events:
            raise StopAsyncIteration
        return self._events.pop(0)

    def take_output(self, index: int, sample: int) -> Optional[Output]:
        """A replayed choice's whole Output (as AsyncStreamIterator.take_output)."""
        return self._outputs.pop((index, sample), None)

    async def aclose(self) -> None:
        self._events.clear()


class CallCache:
    """The server's side of a ResultCache: lookups per call, stores after, metrics."""

    def __init__(self, cache: ResultCache, model: Model, registry: CollectorRegistry) -> None:
        self.cache = cache
        self.model = model
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="parallel_gen-result-cache")
        p = "parallel_gen_result_cache_"
        self.calls = Counter(p + "calls", "Deterministic calls looked up in the result cache: hit (answered "
                                          "without decoding) or miss", ["outcome"], registry=registry)
        counts = cache.counts
        if counts is not None:  # a Redis cache: lookups by level, and Redis' failures
            hits = Gauge(p + "hits", "Prompt lookups found, by level (memory, redis)", ["level"], registry=registry)
            for level in counts.hits:
                hits.labels(level).set_function(lambda level=level: counts.hits[level])
            Gauge(p + "misses", "Prompt lookups found at no level", registry=registry).set_function(
                lambda: counts.misses)
            Gauge(p + "redis_errors", "Redis calls that failed or timed out (the call then ran uncached)",
                  registry=registry).set_function(lambda: counts.errors)

    def _keys(self, call: Call) -> Optional[List[str]]:
        if call.plan is not None:
            return None  # tool calls are read from the reply afterwards: not cached here
        if not all(p.temperature == 0 or p.seed is not None for p in call.params):
            return None  # a random seed: a new answer each time
        return [self.cache.key(self.model, prompt, p) for prompt, p in zip(call.prompts, call.params)]

    def _lookup(self, call: Call) -> Optional[CachePlan]:
        keys = self._keys(call)
        if keys is None:
            return None
        found: List[Completion] = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is None:
                self.calls.labels("miss").inc()
                return CachePlan(keys, None)
            found.append(Completion(i, hit.prompt, hit.outputs, hit.prompt_tokens))
        self.calls.labels("hit").inc()
        return CachePlan(keys, found)

    async def lookup(self, call: Call) -> Optional[CachePlan]:
        """The call's plan (None: not cacheable); when every prompt was found, the call's
        stream is replaced by their replay, so nothing reaches the engine."""
        plan = await anyio.to_thread.run_sync(self._lookup, call)
        if plan is not None and plan.found is not None:
            call.stream = Replay(plan.found)  # type: ignore[assignment]
            logger.info("request %s: answered from the result cache", call.id)
        return plan

    def store(self, call: Call, plan: Optional[CachePlan]) -> None:
        """Stores a finished call's results (off the event loop; a Redis write may be slow)."""
        if plan is None or plan.found is not None:
            return
        completions = []
        for i, prompt in enumerate(call.prompts):
            outputs = []
            for j in range(call.n):
                c = call.choices.get(i * call.n + j)
                if c is None or c.finish_reason is None or c.failure is not None or c.output is None:
                    return
                outputs.append(c.output)
            completions.append(Completion(i, prompt, outputs, call.prompt_tokens[i]))

        reused = [call.cached.get(i, 0) > 0 for i in range(len(call.prompts))]
        items = list(zip(plan.keys, completions, call.params, reused))

        def write() -> None:
            for key, completion, params, reused_kv in items:
                if cacheable_result(self.model, completion, params, reused_kv=reused_kv):
                    self.cache.put(key, completion)

        self._writer.submit(write)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.cache.close()
