"""The one way into a Model's engine: submit typed items, read typed events.

Every surface (generate_parallel and chat_parallel, the streams, generate_iter and the
file jobs, score and classify, the server) talks to the engine thread through a
:class:`Client` (or :class:`AsyncClient` inside an event loop):

- ``submit(items)`` hands one request (any number of sequences) to the engine thread;
- ``next()`` returns the next :class:`Routed` event of any request of this client, and
  raises the typed exception of a request that ended badly (a fatal decode, a broken
  engine thread, a closed Model, a cancel by someone else): that mapping lives here only;
- ``close()`` (or leaving a ``with`` block, however it is left: a result, an exception,
  Ctrl-C) cancels whatever is still in flight and waits until its KV is freed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from .._native import _core
from ..errors import EngineFailedError, GenerationError, ModelClosedError, RequestCancelledError
from .events import Cancelled, Closed, EngineEvent, EngineFailed, Fatal, RequestDone
from .runner import EngineRunner, Item, Request, Share

# Waiting for an event wakes this often, so a thread blocked in next() sees Ctrl-C.
_POLL_SECONDS = 0.1


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Routed:
    """An engine event and the request it belongs to."""

    request: Request
    event: EngineEvent


def failure(event: EngineEvent) -> Optional[GenerationError]:
    """The exception a request's terminal event means; None for every other event."""
    if isinstance(event, Fatal):
        return GenerationError(f"llama.cpp failed while decoding: {event.message}")
    if isinstance(event, EngineFailed):
        return EngineFailedError(f"the engine thread failed ({event.message}); this Model is broken: close it "
                                 "and open a new one")
    if isinstance(event, Closed):
        return ModelClosedError("the Model was closed while this call was running")
    if isinstance(event, Cancelled):
        return RequestCancelledError("the request was cancelled while it was running")
    return None


def runner_of(model: Any) -> EngineRunner:
    """The Model's engine runner; ModelClosedError / EngineFailedError when it has none to offer."""
    runner = model.runner
    if runner is None:
        raise ModelClosedError("this Model is closed")
    if runner.failure is not None:
        raise EngineFailedError(f"the engine thread failed ({runner.failure}); this Model is broken: close it and "
                                "open a new one")
    return runner


class _Base:
    def __init__(self, model: Any, name: Optional[str]) -> None:
        self._runner = runner_of(model)
        self.name = name or new_request_id()
        self._open: Dict[int, Request] = {}
        self._submitted = 0

    @property
    def in_flight(self) -> int:
        """Requests submitted and not ended."""
        return len(self._open)

    def _new(self, items: Iterable[Item], stream: bool, ticks: bool, sink: Any, share: Optional[Share],
             flush: Optional[Callable[[], None]] = None, stream_interval: int = 1) -> Request:
        self._submitted += 1
        name = self.name if self._submitted == 1 else f"{self.name}/{self._submitted}"
        req = Request(name, collections.deque(items), sink, stream=stream, stream_interval=stream_interval,
                      ticks=ticks, share=share, flush=flush)
        self._open[req.id] = req
        return req

    def _route(self, routed: Routed) -> Routed:
        """Bookkeeping of an event read by the caller; raises for a request that ended badly."""
        event = routed.event
        if isinstance(event, RequestDone):
            self._open.pop(routed.request.id, None)
            return routed
        error = failure(event)
        if error is not None:
            self._open.pop(routed.request.id, None)
            raise error
        return routed


class Client(_Base):
    """A caller's link to a Model's engine thread, for one thread (see the module doc)."""

    def __init__(self, model: Any, name: Optional[str] = None) -> None:
        super().__init__(model, name)
        self._queue: "queue.SimpleQueue[Routed]" = queue.SimpleQueue()

    def submit(self, items: Iterable[Item], *, stream: bool = False, ticks: bool = False,
               share: Optional[Share] = None, stream_interval: int = 1) -> Request:
        """Queues one request of ``items``; ``stream``: deltas as tokens arrive (every
        ``stream_interval`` tokens, the first at once); ``ticks``: a Progress event after
        every engine step (progress bars); ``share``: its group for fair turns (the
        server's API key)."""
        # An idle OpenMP team left on this thread (say by a llama_cpp.Llama used here) would
        # slow the engine thread's own: free it (see csrc/bindings.cpp).
        _core.release_caller_openmp_threads()
        holder: List[Request] = []
        req = self._new(items, stream, ticks, lambda event: self._queue.put(Routed(holder[0], event)), share,
                        stream_interval=stream_interval)
        holder.append(req)
        self._runner.submit(req)
        return req

    def next(self) -> Routed:
        """The next event of this client's requests, waiting as long as it takes."""
        while True:
            try:
                return self._route(self._queue.get(timeout=_POLL_SECONDS))
            except queue.Empty:
                continue

    def cancel(self, request: Request) -> None:
        """Drops one request's sequences and KV, and waits until that is done."""
        if self._open.pop(request.id, None) is not None:
            with contextlib.suppress(RuntimeError):  # the Model was closed meanwhile: nothing left
                self._runner.cancel(request).wait()

    def close(self) -> None:
        """Cancels every request still in flight and waits until their KV is freed."""
        for req in list(self._open.values()):
            self.cancel(req)

    def close_soon(self) -> None:
        """close() without waiting or locks, for ``__del__`` (which may run on any thread)."""
        requests, self._open = list(self._open.values()), {}
        for req in requests:
            self._runner.cancel_soon(req)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _LoopInbox:
    """The engine's events for one event loop's clients, handed over in one wakeup of the
    loop per engine step (the runner flushes after each step), not one per event: with
    hundreds of streams the engine thread would otherwise spend its time between two
    decodes waking the loop, and the loop would wake once per token."""

    _inboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: Deque[Tuple["asyncio.Queue[Routed]", Routed]] = collections.deque()
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_LoopInbox":
        with cls._lock:
            inbox = cls._inboxes.get(loop)
            if inbox is None:
                inbox = cls._inboxes[loop] = cls(loop)
            return inbox

    def put(self, q: "asyncio.Queue[Routed]", routed: Routed) -> None:
        """On the engine thread: queues the event until :meth:`flush`."""
        self._items.append((q, routed))

    def flush(self) -> None:
        """On the engine thread: wakes the loop for the queued events, unless a wakeup is
        pending (the loop then takes them too: it clears the flag before draining)."""
        if self._items and not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the event loop is closed: nobody is listening
                self._items.clear()

    def _drain(self) -> None:
        self._scheduled = False
        items = self._items
        while items:
            q, routed = items.popleft()
            q.put_nowait(routed)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: ``submit`` from inside the running loop,
    ``await next()``, ``await aclose()``."""

    def __init__(self, model: Any, name: Optional[str] = None) -> None:
        super().__init__(model, name)
        self._queue: Optional["asyncio.Queue[Routed]"] = None
        self._cancels: Dict[int, threading.Event] = {}  # requests being cancelled by aclose()

    def submit(self, items: Iterable[Item], *, stream: bool = False, ticks: bool = False,
               share: Optional[Share] = None, stream_interval: int = 1) -> Request:
        inbox = _LoopInbox.of(asyncio.get_running_loop())
        if self._queue is None:
            self._queue = asyncio.Queue()
        q = self._queue
        holder: List[Request] = []

        def sink(event: EngineEvent) -> None:  # on the engine thread
            inbox.put(q, Routed(holder[0], event))

        _core.release_caller_openmp_threads()
        req = self._new(items, stream, ticks, sink, share, inbox.flush, stream_interval)
        holder.append(req)
        self._runner.submit(req)
        return req

    async def next(self) -> Routed:
        if self._queue is None:
            raise RuntimeError("nothing was submitted")
        return self._route(await self._queue.get())

    async def aclose(self) -> None:
        """Cancels every request still in flight; returns once their KV is freed (an aclose
        running meanwhile, say from another task, waits for the same cancels)."""
        for req in list(self._open.values()):
            if req.id not in self._cancels:
                try:
                    self._cancels[req.id] = self._runner.cancel(req)
                except RuntimeError:  # the Model was closed meanwhile: nothing left
                    self._open.pop(req.id, None)
        loop = asyncio.get_running_loop()
        for rid, done in list(self._cancels.items()):
            # A request leaves _open only once its cancel is done: until then it is in flight.
            await loop.run_in_executor(None, done.wait)
            self._cancels.pop(rid, None)
            self._open.pop(rid, None)

    def close_soon(self) -> None:
        requests, self._open = list(self._open.values()), {}
        for req in requests:
            self._runner.cancel_soon(req)

