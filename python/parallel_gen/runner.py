"""The engine thread: one batch loop per Model, shared by every caller.

Callers (generate_parallel, chat_parallel, streams, from any thread) hand a request to
the runner; the runner's thread owns the C++ engine outright, so the engine needs no
locking. Between two batch steps it applies commands (new requests, cancellations),
tops up the engine's queue, and routes each step's results and stream deltas to the
request they belong to.

Fairness: requests feed the engine's queue round-robin, one sequence at a time, and the
queue is kept short (two sequences per slot). A caller submitting 10,000 prompts
therefore cannot push another caller's 4 prompts behind all of its own: they join the
batch as soon as slots free, in turn with the big request's.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Union

from ._native import _core
from .events import (Cancelled, Closed, EngineCounters, Fatal, Progress, RequestDone, SequenceDelta,
                     SequenceFinished, SequenceResult, Delta, Sink)

logger = logging.getLogger("parallel_gen")

_ids = itertools.count(1)


@dataclass(frozen=True)
class Item:
    """One sequence to submit to the engine: one sample of one prompt."""

    index: int
    """The prompt's position in its request."""
    sample: int
    prompt: bytes
    """The prompt as UTF-8."""
    config: "_core.SamplingConfig"
    """The sample's native sampling parameters (its seed resolved)."""


@dataclass(eq=False)
class Request:
    """One call's sequences on their way through the engine."""

    name: str
    items: Deque[Item]
    sink: Sink
    stream: bool = False
    ticks: bool = False
    """Send a Progress event after every engine step."""
    id: int = field(default_factory=lambda: next(_ids))
    remaining: int = 0  # sequences not finished yet (queued here or in the engine)
    started: float = field(default_factory=time.perf_counter)
    # The engine's counters over the steps this request was active in: exact for a lone
    # call; with concurrent calls they include the others' work in the same steps.
    counters: EngineCounters = field(default_factory=EngineCounters)

    def __post_init__(self) -> None:
        self.remaining = len(self.items)


# Commands from callers to the engine thread, applied between two steps.
@dataclass(frozen=True)
class _Submit:
    request: Request


@dataclass(frozen=True)
class _Cancel:
    request: Request
    done: Optional[threading.Event]  # None: nobody waits (cancel_soon)


@dataclass(frozen=True)
class _Call:
    fn: Callable[["_core.Engine"], Any]
    box: List[Any]
    done: threading.Event


@dataclass(frozen=True)
class _Stop:
    pass


_Command = Union[_Submit, _Cancel, _Call, _Stop]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of a Model's engine (``Model.stats()``)."""

    active_requests: int
    """Calls with sequences queued or running."""
    queued_prompts: int
    """Sequences waiting for a slot (all requests)."""
    slots_busy: int
    """Slots decoding a sequence now (of n_parallel)."""
    n_parallel: int
    tokens_generated: int
    """Tokens generated since the Model was opened."""
    requests_completed: int
    uptime_seconds: float
    decode_calls: int = 0
    """llama_decode calls since the Model was opened: fewer than tokens_generated when
    sequences share steps."""
    kv_cells_used: int = 0
    """KV cells holding a token now, over every sequence (a shared prefix included, the
    prompt cache not)."""
    kv_cells_cached: int = 0
    """KV cells the prompt cache holds now (finished prompts kept for later ones)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens not decoded since the Model was opened: their KV was in the prompt cache."""
    prompt_cache_hits: int = 0
    """Prompt cache lookups that found KV to start from since the Model was opened (see
    BatchStats.prompt_cache_hits)."""
    prompt_cache_misses: int = 0
    """Prompt cache lookups that found nothing to start from."""
    prompt_cache_evictions: int = 0
    """Prompt cache entries dropped for room, or overwritten, since the Model was opened."""

    @property
    def prompt_cache_hit_rate(self) -> float:
        """prompt_cache_hits / (hits + misses); 0 before any lookup."""
        looked = self.prompt_cache_hits + self.prompt_cache_misses
        return self.prompt_cache_hits / looked if looked else 0.0


class EngineRunner:
    """Runs one engine's batch loop on a daemon thread (started on first use)."""

    def __init__(self, engine: "_core.Engine", n_parallel: int, keepalive: Any = None) -> None:
        self._engine = engine
        self._keepalive = keepalive  # a llama_cpp.Llama whose weights the engine borrows
        self._n_parallel = n_parallel
        self._feed_target = 2 * n_parallel
        # SimpleQueue: its put() is reentrant, so cancel_soon() is safe from __del__ even
        # when the garbage collector runs inside this queue's own get().
        self._commands: "queue.SimpleQueue[_Command]" = queue.SimpleQueue()
        self._requests: Dict[int, Request] = {}
        self._turns: Deque[Request] = collections.deque()  # requests with items to feed
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self._opened = time.perf_counter()
        # queued, busy, completed, KV cells, cached KV cells, a copy of the totals
        self._snapshot = (0, 0, 0, 0, 0, EngineCounters())
        self._totals = EngineCounters()  # since the Model opened
        self._completed = 0

    # -- called from any thread ---------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._send(_Submit(request))

    def cancel(self, request: Request) -> threading.Event:
        """Drops the request's sequences and KV; the event is set once that is done."""
        done = threading.Event()
        self._send(_Cancel(request, done))
        return done

    def cancel_soon(self, request: Request) -> None:
        """Cancels without waiting and without taking any lock: for ``__del__`` methods,
        which may run on any thread at any moment (the engine's included)."""
        if self._thread is not None and not self._stopped:
            self._commands.put(_Cancel(request, None))

    def run_on_engine(self, fn: Callable[["_core.Engine"], Any]) -> Any:
        """Runs ``fn(engine)`` on the engine thread between two steps; returns its result."""
        box: List[Any] = []
        done = threading.Event()
        self._send(_Call(fn, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def stats(self) -> EngineStats:
        queued, busy, completed, kv_cells, cached, t = self._snapshot
        return EngineStats(active_requests=len(self._requests), queued_prompts=queued, slots_busy=busy,
                           n_parallel=self._n_parallel, tokens_generated=int(t.generated_tokens),
                           requests_completed=completed, uptime_seconds=time.perf_counter() - self._opened,
                           decode_calls=int(t.decode_calls),
                           kv_cells_used=kv_cells, kv_cells_cached=cached,
                           cached_prompt_tokens=int(t.cached_prompt_tokens), prompt_cache_hits=int(t.prompt_cache_hits),
                           prompt_cache_misses=int(t.prompt_cache_misses),
                           prompt_cache_evictions=int(t.prompt_cache_evictions))

    def stop(self) -> None:
        """Cancels everything, ends the thread and waits for it. Idempotent."""
        with self._start_lock:
            thread, self._stopped = self._thread, True
        if thread is not None:
            self._commands.put(_Stop())
            thread.join()

    def stop_soon(self) -> None:
        """stop() without waiting or locks, for ``__del__``: the thread ends after its step."""
        self._stopped = True
        if self._thread is not None:
            self._commands.put(_Stop())

    def _send(self, command: _Command) -> None:
        with self._start_lock:
            if self._stopped:
                raise RuntimeError("this Model is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="parallel_gen-engine", daemon=True)
                self._thread.start()
            self._commands.put(command)

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        while True:
            idle = not engine.has_work() and not self._turns
            if idle:
                # Going to sleep: free this thread's OpenMP team, or its docked threads
                # would slow down llama.cpp work on other threads (see the C++ side).
                _core.release_caller_openmp_threads()
            try:
                command = self._commands.get(block=idle)
                while True:
                    if not self._apply(command):
                        return
                    command = self._commands.get_nowait()
            except queue.Empty:
                pass
            self._feed()
            if engine.has_work():
                self._step()
            self._refresh()

    def _apply(self, command: _Command) -> bool:
        """Applies one command; False when the thread must end."""
        if isinstance(command, _Submit):
            req = command.request
            self._requests[req.id] = req
            if req.items:
                self._turns.append(req)
                logger.debug("request %s: %d sequences queued", req.name, len(req.items))
            else:
                self._finish(req)
        elif isinstance(command, _Cancel):
            req = command.request
            if self._requests.pop(req.id, None) is not None:
                self._drop(req)
                req.sink(Cancelled())
                logger.info("request %s: cancelled", req.name)
            self._refresh()  # so stats() read after the wait already shows it gone
            if command.done is not None:
                command.done.set()
        elif isinstance(command, _Call):
            try:
                command.box.append(command.fn(self._engine))
            except BaseException as e:  # handed to the caller
                command.box.append(e)
            command.done.set()
        elif isinstance(command, _Stop):
            self._engine.cancel_all()
            for req in list(self._requests.values()):
                req.sink(Closed())
            self._requests.clear()
            self._turns.clear()
            return False
        return True

    def _drop(self, req: Request) -> None:
        req.items.clear()
        if req in self._turns:
            self._turns.remove(req)
        self._engine.cancel_request(req.id)

    def _feed(self) -> None:
        """Round-robin over requests, one sequence each, until the engine's queue is full."""
        engine = self._engine
        while self._turns and engine.n_waiting < self._feed_target:
            req = self._turns.popleft()
            item = req.items.popleft()
            engine.submit(item.index, item.sample, item.prompt, item.config, req.id, req.stream)
            if req.items:
                self._turns.append(req)

    def _step(self) -> None:
        engine = self._engine
        active = list(self._requests.values())
        finished, fatal, deltas = engine.step()
        counters = EngineCounters.from_native(engine.counters())
        engine.reset_counters()
        for req in active:
            req.counters.add(counters)
        self._totals.add(counters)
        # Callers woken by this step's events may read stats() at once: show them this step.
        self._refresh()
        for d in deltas:
            req = self._requests.get(d.request)
            if req is not None:
                req.sink(SequenceDelta(Delta.from_native(d)))
        failed = set()
        for r in finished:
            req = self._requests.get(r.request)
            if req is None:
                continue
            if r.aborted:
                failed.add(req)
                continue
            req.sink(SequenceFinished(SequenceResult.from_native(r)))
            req.remaining -= 1
            if req.remaining == 0:
                self._finish(req)
        if fatal:
            for req in failed:
                self._requests.pop(req.id, None)
                self._drop(req)
                self._refresh()
                req.sink(Fatal(fatal))
                logger.error("request %s: llama.cpp failed: %s", req.name, fatal)
        for req in self._requests.values():
            if req.ticks:
                req.sink(Progress(req.counters.generated_tokens))

    def _refresh(self) -> None:
        engine = self._engine
        queued = engine.n_waiting + sum(len(r.items) for r in self._turns)
        self._snapshot = (queued, engine.n_live, self._completed, engine.kv_tokens, engine.cached_tokens,
                          dataclasses.replace(self._totals))

    def _finish(self, req: Request) -> None:
        self._requests.pop(req.id, None)
        self._completed += 1
        self._refresh()
        req.sink(RequestDone())
        logger.debug("request %s: done in %.2f s", req.name, time.perf_counter() - req.started)
