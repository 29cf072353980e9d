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

Requests may carry a :class:`Share` (the server's API key name and weight): turns then go
to groups first (weighted, stride scheduling), so one key sending many requests gets its
weight's share of the slots, not one turn per request; and the engine's queue, which is
first come first served, holds only what the free slots take now, so another key's
sequence is never behind a queue of this one's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Union

from .._native import _core
from .events import (Cancelled, Closed, Delta, EngineCounters, EngineEvent, EngineFailed, Fatal, Progress, RequestDone,
                     SequenceDelta, SequenceFinished, SequenceResult, Listener)
from ..results import hit_rate

logger = logging.getLogger("parallel_gen")

_ids = itertools.count(1)


@dataclass(frozen=True)
class Item:
    """One sequence to submit to the engine: one sample of one prompt."""

    index: int
    """The prompt's position in its request."""
    sample: int
    tokens: List[int]
    """The prompt's token ids."""
    config: "_core.SamplingConfig"
    """The sample's native sampling parameters (its seed resolved)."""

    def to_native(self, request: int, stream: bool, stream_interval: int = 1) -> "_core.Item":
        native = _core.Item()
        native.request, native.index, native.sample, native.stream = request, self.index, self.sample, stream
        native.stream_interval = stream_interval
        native.tokens, native.params = self.tokens, self.config
        return native


@dataclass(frozen=True)
class Share:
    """Whose sequences these are, for fair turns across groups (see the module doc)."""

    group: str
    weight: int = 1


@dataclass(eq=False)
class Request:
    """One call's sequences on their way through the engine."""

    name: str
    items: Deque[Item]
    listener: Listener
    stream: bool = False
    stream_interval: int = 1
    """With ``stream``: a delta once this many tokens are new (the first token at once)."""
    ticks: bool = False
    """Send a Progress event after every engine step."""
    share: Optional[Share] = None
    id: int = field(default_factory=lambda: next(_ids))
    remaining: int = 0  # sequences not finished yet (queued here or in the engine)
    started: float = field(default_factory=time.perf_counter)
    # The engine's counters over the steps this request was active in: exact for a lone
    # call; with concurrent calls they include the others' work in the same steps. Set
    # when it ends, from the runner's totals then and when it was admitted (``since``):
    # a step costs the same however many requests are active.
    counters: EngineCounters = field(default_factory=EngineCounters)
    since: Optional[EngineCounters] = None
    flush: Optional[Callable[[], None]] = None
    """Hands the events told so far on (an event loop's clients: one wakeup for a whole
    step's events); the runner calls it after each step and command, None: not needed."""

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
    kv_tokens: int = 0
    """KV positions held now, summed over every sequence id (a shared prefix's own and each
    copy of it): tokens, not cells, since a unified pool lets sequences share cells. The
    prompt cache's entries are not counted: see kv_tokens_cached."""
    kv_tokens_cached: int = 0
    """Tokens whose KV the prompt cache holds now (finished prompts kept for later ones)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens not decoded since the Model was opened: their KV was in the prompt cache."""
    prompt_cache_hits: int = 0
    """Prompt cache lookups that found KV to start from since the Model was opened (see
    BatchStats.prompt_cache_hits)."""
    prompt_cache_misses: int = 0
    """Prompt cache lookups that found nothing to start from."""
    prompt_cache_evictions: int = 0
    """Prompt cache entries dropped for room, or overwritten, since the Model was opened."""
    host_seconds: float = 0.0
    """Engine time outside llama_decode since the Model was opened (BatchStats.host_seconds)."""
    host_cache_hits: int = 0
    """Of prompt_cache_hits, those restored from the host tier (ModelConfig.cache_ram)."""
    host_cached_tokens: int = 0
    """Of cached_prompt_tokens, those restored from the host tier."""
    host_cache_saves: int = 0
    """Entries saved to the host tier before their KV stream was reused."""
    host_cache_evictions: int = 0
    """Host tier entries dropped to stay within cache_ram."""
    host_cache_bytes: int = 0
    """Host memory the host tier holds now (KV state and tokens; at most cache_ram MiB)."""
    host_cache_entries: int = 0
    """Entries in the host tier now."""
    host_tokens_cached: int = 0
    """Tokens whose KV the host tier holds now."""
    host_saved_tokens: int = 0
    """Tokens the host tier's saves held, since the Model was opened."""
    host_save_seconds: float = 0.0
    """Time spent saving KV state to the host tier, since the Model was opened."""
    host_restore_seconds: float = 0.0
    """Time spent restoring KV state from the host tier, since the Model was opened."""
    host_restore_failures: int = 0
    """Restores llama.cpp refused since the Model was opened (the entry was dropped and the
    prompt decoded instead: a correct answer, at the cost of a decode)."""
    backend_sampled_tokens: int = 0
    """Tokens sampled in llama.cpp's graph since the Model was opened (backend_sampling)."""

    @property
    def prompt_cache_hit_rate(self) -> float:
        """prompt_cache_hits / (hits + misses); 0 before any lookup."""
        return hit_rate(self.prompt_cache_hits, self.prompt_cache_misses)


@dataclass(frozen=True)
class _Snapshot:
    """What stats() reads, written by the engine thread after each step."""

    queued: int = 0
    busy: int = 0
    completed: int = 0
    kv_tokens: int = 0
    kv_tokens_cached: int = 0
    host_bytes: int = 0
    host_entries: int = 0
    host_tokens: int = 0
    totals: EngineCounters = field(default_factory=EngineCounters)
    """A copy of the counters since the Model opened."""


class EngineRunner:
    """Runs one engine's batch loop on a daemon thread (started on first use).

    The thread cannot die silently: an exception escaping the loop (a bug, not a llama.cpp
    failure, which the engine reports itself) is delivered to every waiting request as
    :class:`EngineFailed`, the runner is marked broken, and from then on it answers every
    command at once (new requests fail, cancels and stop() return) until it is stopped.
    """

    def __init__(self, engine: "_core.Engine", n_parallel: int, keepalive: Any = None) -> None:
        self._engine: Optional["_core.Engine"] = engine
        self._keepalive = keepalive  # a llama_cpp.Llama whose weights the engine borrows
        self._n_parallel = n_parallel
        self._feed_target = 2 * n_parallel
        # SimpleQueue: its put() is reentrant, so cancel_soon() is safe from __del__ even
        # when the garbage collector runs inside this queue's own get().
        self._commands: "queue.SimpleQueue[_Command]" = queue.SimpleQueue()
        self._requests: Dict[int, Request] = {}
        self._turns: Deque[Request] = collections.deque()  # requests with items to feed
        self._passes: Dict[str, float] = {}  # per Share group: its place in the weighted turns
        self._vtime = 0.0  # the pass of the group served last
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._stopped = False
        self._failure: Optional[str] = None  # set when the loop failed: the runner is broken
        self._opened = time.perf_counter()
        self._snapshot = _Snapshot()
        self._totals = EngineCounters()  # since the Model opened
        self._completed = 0
        self._unflushed: Optional[Dict[int, Request]] = None  # told, not yet flushed (inside _telling)

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

    @property
    def failure(self) -> Optional[str]:
        """Why the engine thread failed (the runner is then broken); None while it works."""
        return self._failure

    def stats(self) -> EngineStats:
        s = self._snapshot
        t = s.totals
        return EngineStats(active_requests=len(self._requests), queued_prompts=s.queued, slots_busy=s.busy,
                           n_parallel=self._n_parallel, tokens_generated=int(t.generated_tokens),
                           requests_completed=s.completed, uptime_seconds=time.perf_counter() - self._opened,
                           decode_calls=int(t.decode_calls), kv_tokens=s.kv_tokens,
                           kv_tokens_cached=s.kv_tokens_cached, cached_prompt_tokens=int(t.cached_prompt_tokens),
                           prompt_cache_hits=int(t.prompt_cache_hits), prompt_cache_misses=int(t.prompt_cache_misses),
                           prompt_cache_evictions=int(t.prompt_cache_evictions),
                           host_cache_hits=int(t.host_cache_hits), host_cached_tokens=int(t.host_cached_tokens),
                           host_cache_saves=int(t.host_cache_saves),
                           host_cache_evictions=int(t.host_cache_evictions), host_cache_bytes=s.host_bytes,
                           host_cache_entries=s.host_entries, host_tokens_cached=s.host_tokens,
                           host_saved_tokens=int(t.host_saved_tokens), host_save_seconds=t.host_save_seconds,
                           host_restore_seconds=t.host_restore_seconds,
                           host_restore_failures=int(t.host_restore_failures),
                           backend_sampled_tokens=int(t.backend_sampled_tokens), host_seconds=t.host_seconds)

    def stop(self) -> None:
        """Cancels everything, ends the thread and waits for it. Idempotent."""
        with self._start_lock:
            thread, self._stopped = self._thread, True
        if thread is not None:
            self._commands.put(_Stop())
            thread.join()
        self._engine = None  # the context is freed now, not when the last handle to us goes

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
        try:
            self._loop()
        except BaseException as e:  # a bug: tell every caller instead of leaving them waiting
            self._fail(e)
            self._serve_broken()
        finally:
            self._engine = None  # frees the context on this thread, as soon as the loop ends
            # stop_soon() takes no lock (it runs from __del__): a command sent just before it
            # may sit behind its _Stop. Answer those; the lock makes later sends raise instead.
            with self._start_lock:
                self._stopped = True
                while True:
                    try:
                        self._refuse(self._commands.get_nowait(), Closed(), "this Model is closed")
                    except queue.Empty:
                        break

    def _loop(self) -> None:
        engine = self._engine
        if engine is None:
            return  # stopped before it ever ran
        while True:
            idle = not engine.has_work() and not self._turns
            if idle:
                # Going to sleep: free this thread's OpenMP team, or its docked threads
                # would slow down llama.cpp work on other threads (see the C++ side).
                _core.release_caller_openmp_threads()
            with self._telling():
                try:
                    command = self._commands.get(block=idle)
                    while True:
                        if not self._apply(command):
                            return
                        command = self._commands.get_nowait()
                except queue.Empty:
                    pass
            with self._telling():
                self._feed()
                if engine.has_work():
                    self._step()
                self._refresh()

    def _fail(self, e: BaseException) -> None:
        self._failure = f"{type(e).__name__}: {e}"
        logger.critical("the engine thread failed; this Model is broken, close it and open a new one",
                        exc_info=(type(e), e, e.__traceback__))
        failed = list(self._requests.values())
        self._requests.clear()
        self._turns.clear()
        for req in failed:
            self._tell(req, EngineFailed(self._failure))
        with contextlib.suppress(BaseException):
            self._engine.cancel_all()  # type: ignore[union-attr]

    def _serve_broken(self) -> None:
        """Answers every command at once, so nobody waits on a broken runner, until stop()."""
        while True:
            command = self._commands.get()
            if isinstance(command, _Stop):
                return
            self._refuse(command, EngineFailed(self._failure or "failed"),
                         f"the engine thread failed: {self._failure}")

    def _refuse(self, command: _Command, event: EngineEvent, why: str) -> None:
        """Answers a command that will not run, so that nobody waits on it: a submitted
        request gets ``event``, a cancel is done at once, a call raises RuntimeError(why)."""
        if isinstance(command, _Submit):
            self._tell(command.request, event)
        elif isinstance(command, _Cancel):
            if command.done is not None:
                command.done.set()
        elif isinstance(command, _Call):
            command.box.append(RuntimeError(why))
            command.done.set()

    @contextlib.contextmanager
    def _telling(self) -> Iterator[None]:
        """Events told inside are handed on (the requests' flush) once, at the end."""
        self._unflushed = {}
        try:
            yield
        finally:
            flushes, self._unflushed = self._unflushed, None
            for req in flushes.values():
                self._flush(req)

    def _tell(self, req: Request, event: EngineEvent) -> None:
        """A request's listener must not raise; one that does is a bug in its caller, and
        must not take the engine thread (and every other caller) down with it."""
        try:
            req.listener(event)
        except BaseException:
            logger.exception("request %s: its event listener failed", req.name)
        if req.flush is not None:
            if self._unflushed is None:
                self._flush(req)
            else:
                self._unflushed[req.id] = req

    @staticmethod
    def _flush(req: Request) -> None:
        try:
            req.flush()  # type: ignore[misc]
        except BaseException:
            logger.exception("request %s: its event listener failed", req.name)

    def _apply(self, command: _Command) -> bool:
        """Applies one command; False when the thread must end."""
        if isinstance(command, _Submit):
            req = command.request
            self._requests[req.id] = req
            req.since = dataclasses.replace(self._totals)
            if req.items:
                self._turns.append(req)
                logger.debug("request %s: %d sequences queued", req.name, len(req.items))
            else:
                self._finish(req)
        elif isinstance(command, _Cancel):
            req = command.request
            if self._requests.pop(req.id, None) is not None:
                self._drop(req)
                self._tell(req, Cancelled())
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
            self._engine.cancel_all()  # type: ignore[union-attr]
            for req in list(self._requests.values()):
                self._tell(req, Closed())
            self._requests.clear()
            self._turns.clear()
            return False
        return True

    def _settle(self, req: Request) -> None:
        """Sets the counters of a request that leaves: the totals' growth since it came."""
        if req.since is not None:
            req.counters, req.since = self._totals.since(req.since), None

    def _drop(self, req: Request) -> None:
        self._settle(req)
        req.items.clear()
        if req in self._turns:
            self._turns.remove(req)
        self._engine.cancel_request(req.id)  # type: ignore[union-attr]

    def _feed(self) -> None:
        """Round-robin over requests (over Share groups first), one sequence each, until the
        engine's queue is full."""
        engine = self._engine
        shared = any(r.share is not None for r in self._turns)
        while self._turns:
            if shared:  # only what free slots take now (see the module doc)
                if engine.n_waiting >= self._n_parallel - engine.n_live:  # type: ignore[union-attr]
                    break
                req = self._next_shared()
            elif engine.n_waiting < self._feed_target:  # type: ignore[union-attr]
                req = self._turns.popleft()
            else:
                break
            engine.submit(req.items.popleft().to_native(req.id, req.stream, req.stream_interval))  # type: ignore[union-attr]
            if req.items:
                self._turns.append(req)

    def _next_shared(self) -> Request:
        """The next request by weighted turns across groups (stride scheduling: a group's pass
        grows by 1/weight per sequence; the smallest pass goes next; a group that was idle
        starts at the current pass, so it gets no burst for the time it waited for nothing).
        Within a group, its requests take turns in order. Requests without a Share form one
        group of weight 1."""
        first: Dict[str, Request] = {}
        for r in self._turns:
            g = r.share.group if r.share is not None else ""
            first.setdefault(g, r)
        group = min(first, key=lambda g: max(self._passes.get(g, 0.0), self._vtime))
        req = first[group]
        self._turns.remove(req)
        self._vtime = max(self._passes.get(group, 0.0), self._vtime)
        self._passes[group] = self._vtime + 1.0 / (req.share.weight if req.share is not None else 1)
        return req

    def _step(self) -> None:
        engine = self._engine
        out = engine.step()  # type: ignore[union-attr]
        counters = EngineCounters.from_native(engine.counters())  # type: ignore[union-attr]
        engine.reset_counters()  # type: ignore[union-attr]
        self._totals.add(counters)
        # Callers woken by this step's events may read stats() at once: show them this step.
        self._refresh()
        for d in out.deltas:
            req = self._requests.get(d.request)
            if req is not None:
                self._tell(req, SequenceDelta(Delta.from_native(d)))
        failed = set()
        for r in out.finished:
            req = self._requests.get(r.request)
            if req is None:
                continue
            result = SequenceResult.from_native(r)
            if result.aborted:
                failed.add(req)
                continue
            self._tell(req, SequenceFinished(result))
            req.remaining -= 1
            if req.remaining == 0:
                self._finish(req)
        if out.fatal:
            for req in failed:
                self._requests.pop(req.id, None)
                self._drop(req)
                self._refresh()
                self._tell(req, Fatal(out.fatal))
                logger.error("request %s: llama.cpp failed: %s", req.name, out.fatal)
        for req in self._requests.values():
            if req.ticks:
                since = req.since.generated_tokens if req.since is not None else 0
                self._tell(req, Progress(self._totals.generated_tokens - since))

    def _refresh(self) -> None:
        engine = self._engine
        if engine is None:
            return
        self._snapshot = _Snapshot(queued=engine.n_waiting + sum(len(r.items) for r in self._turns),
                                   busy=engine.n_live, completed=self._completed, kv_tokens=engine.kv_tokens,
                                   kv_tokens_cached=engine.cached_tokens, host_bytes=engine.host_bytes,
                                   host_entries=engine.host_entries, host_tokens=engine.host_tokens,
                                   totals=dataclasses.replace(self._totals))

    def _finish(self, req: Request) -> None:
        self._requests.pop(req.id, None)
        self._settle(req)
        self._completed += 1
        self._refresh()
        self._tell(req, RequestDone())
        logger.debug("request %s: done in %.2f s", req.name, time.perf_counter() - req.started)

