"""Streaming: events as tokens arrive, from a plain or an async iterator.

Both iterators submit into the Model's shared engine; closing one (or dropping it, or
breaking out of its loop) cancels its sequences and frees their KV cache.
"""

from __future__ import annotations

import asyncio
import collections
import queue
from dataclasses import dataclass
from typing import Any, AsyncIterator, Deque, Dict, Iterator, List, Optional, Tuple, Union

from ._native import _core
from .errors import GenerationError
from .events import (Cancelled, Closed, EngineEvent, Fatal, Progress, RequestDone, SequenceDelta, SequenceFinished,
                     Sink, public_logprobs)
from .generate import (CANCELLED_MESSAGE, CLOSED_MESSAGE, ModelLike, Params, Prompts, _check_against_model,
                       _open_model, _param_list, _prompt_list, fatal_message, new_request_id, next_event,
                       prompt_items)
from .results import TokenLogprobs
from .runner import Item, Request


@dataclass(frozen=True)
class StreamEvent:
    """New output of one prompt (one sample of it) since its previous event."""

    index: int
    """The prompt's position in the call's prompts."""
    text: str
    """Text generated since the previous event of this prompt and sample: whole
    characters only, and never the start of what may turn out to be a stop string."""
    token_ids: List[int]
    """Tokens generated since the previous event."""
    finished: bool
    """True on the prompt's (sample's) last event."""
    finish_reason: Optional[str] = None
    """On the last event: "stop", "length" or "error"."""
    sample: int = 0
    """Which of the prompt's SamplingParams.n samples."""
    stop_reason: Union[str, int, None] = None
    error: Optional[str] = None
    logprobs: Optional[List[TokenLogprobs]] = None
    """When SamplingParams.logprobs is set: the log-probabilities of this event's
    ``token_ids``, one each (the events of a prompt together cover its whole output)."""
    cached_tokens: int = 0
    """On the last event: prompt tokens whose KV was reused (the Model's prompt cache,
    or a prefix shared with other prompts) rather than decoded for this sample."""


class _StreamState:
    """What both iterators share: submission, and turning engine output into events."""

    def __init__(self, model: ModelLike, prompts: Prompts, params: Params, overrides: Dict[str, Any],
                 request_id: Optional[str]) -> None:
        prompt_list = _prompt_list(prompts)
        param_list = _param_list(params, overrides, len(prompt_list))
        self.model, self.owns_model = _open_model(model)
        try:
            _check_against_model(self.model, param_list)
        except BaseException:
            self.release_model()
            raise
        self.ready: Deque[StreamEvent] = collections.deque()
        items: Deque[Item] = collections.deque()
        for i, (prompt, p) in enumerate(zip(prompt_list, param_list)):
            mine, error = prompt_items(i, prompt, p)
            if error:
                self.ready.extend(StreamEvent(i, "", [], True, "error", j, None, error) for j in range(p.n))
            items.extend(mine)
        self.sent: Dict[Tuple[int, int], Tuple[int, int]] = {}  # (index, sample) -> (bytes, tokens) sent
        self.request: Optional[Request] = None
        self.items = items
        self.name = request_id or new_request_id()
        self.finished = False

    def submit(self, sink: Sink) -> None:
        _core.release_caller_openmp_threads()  # an idle team here would slow the engine's
        self.request = Request(self.name, self.items, sink, stream=True)
        self.model._require_runner().submit(self.request)

    def event(self, event: EngineEvent) -> Optional[StreamEvent]:
        """The StreamEvent for one engine event; None when it has nothing to show."""
        if isinstance(event, SequenceDelta):
            d = event.delta
            key = (d.index, d.sample)
            sent_bytes, sent_tokens = self.sent.get(key, (0, 0))
            self.sent[key] = (sent_bytes + len(d.text), sent_tokens + len(d.token_ids))
            return StreamEvent(d.index, d.text.decode("utf-8", "replace"), list(d.token_ids), False, sample=d.sample,
                               logprobs=public_logprobs(d.token_ids, d.logprobs, self.model._token_text))
        if isinstance(event, SequenceFinished):
            r = event.result
            sent_bytes, sent_tokens = self.sent.pop((r.index, r.sample), (0, 0))
            raw = r.logprobs[sent_tokens:] if r.logprobs is not None else None
            return StreamEvent(r.index, r.text[sent_bytes:].decode("utf-8", "replace"), r.token_ids[sent_tokens:],
                               True, r.finish_reason, r.sample, r.stop_reason, r.error,
                               public_logprobs(r.token_ids[sent_tokens:], raw, self.model._token_text),
                               r.cached_tokens)
        if isinstance(event, Progress):
            return None
        self.finished = True  # every other event is a request's last
        if isinstance(event, RequestDone):
            return None
        if isinstance(event, Fatal):
            raise GenerationError(fatal_message(event), [])
        if isinstance(event, Closed):
            raise GenerationError(CLOSED_MESSAGE, [])
        if isinstance(event, Cancelled):  # by someone else: our own close() stops reading first
            raise GenerationError(CANCELLED_MESSAGE, [])
        raise AssertionError(f"unexpected engine event {event!r}")

    def cancel_soon(self) -> None:
        """Cancel from ``__del__``: no waiting, no locks (see EngineRunner.cancel_soon)."""
        runner = self.model._runner
        if self.request is not None and not self.finished and runner is not None:
            self.finished = True
            runner.cancel_soon(self.request)

    def cancel(self) -> Any:
        """Cancels the request if it is still running; returns an Event to wait on, or None."""
        done = None
        if self.request is not None and not self.finished:
            self.finished = True
            try:
                done = self.model._require_runner().cancel(self.request)
            except RuntimeError:  # the Model is already closed
                done = None
        return done

    def release_model(self) -> None:
        if self.owns_model:
            self.owns_model = False
            self.model.close()


class StreamIterator(Iterator[StreamEvent]):
    """Iterator of :class:`StreamEvent`; ``close()`` (or ``with``) cancels what is left."""

    def __init__(self, state: _StreamState) -> None:
        self._state = state
        self._events: "queue.SimpleQueue[EngineEvent]" = queue.SimpleQueue()
        state.submit(self._events.put)

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> StreamEvent:
        st = self._state
        while not st.ready:
            if st.finished:
                self.close()
                raise StopIteration
            try:
                ev = st.event(next_event(self._events))
            except BaseException:
                self.close()  # Ctrl-C or a failure: cancel, then let it propagate
                raise
            if ev is not None:
                return ev
        return st.ready.popleft()

    def close(self) -> None:
        done = self._state.cancel()
        if done is not None:
            done.wait()
        self._state.release_model()

    def __enter__(self) -> "StreamIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Abandoned: cancel without waiting (this may run on any thread, even the engine's).
        try:
            self._state.cancel_soon()
        except Exception:
            pass


class AsyncStreamIterator(AsyncIterator[StreamEvent]):
    """Async iterator of :class:`StreamEvent`; ``await aclose()`` cancels what is left."""

    def __init__(self, state: _StreamState) -> None:
        self._state = state
        self._queue: Optional["asyncio.Queue[EngineEvent]"] = None

    def __aiter__(self) -> "AsyncStreamIterator":
        return self

    def _start(self) -> "asyncio.Queue[EngineEvent]":
        loop = asyncio.get_running_loop()
        q: "asyncio.Queue[EngineEvent]" = asyncio.Queue()

        def sink(event: EngineEvent) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        self._state.submit(sink)
        return q

    async def __anext__(self) -> StreamEvent:
        if self._queue is None:
            self._queue = self._start()  # submitted on first use, inside the running loop
        st = self._state
        while not st.ready:
            if st.finished:
                await self.aclose()
                raise StopAsyncIteration
            try:
                ev = st.event(await self._queue.get())
            except BaseException:
                await self.aclose()
                raise
            if ev is not None:
                return ev
        return st.ready.popleft()

    async def aclose(self) -> None:
        done = self._state.cancel()
        if done is not None:
            await asyncio.get_running_loop().run_in_executor(None, done.wait)
        self._state.release_model()

    def __del__(self) -> None:
        try:
            self._state.cancel_soon()
        except Exception:
            pass


def stream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                    request_id: Optional[str] = None, **overrides: Any) -> StreamIterator:
    """Like :func:`generate_parallel`, but yields :class:`StreamEvent` as tokens arrive.

    Events of different prompts interleave in generation order; each prompt's (sample's)
    last event has ``finished=True`` and its finish reason. The prompts start decoding
    at once. Closing the iterator (``close()``, leaving a ``with`` block, or dropping
    it) cancels the prompts still running and frees their KV cache.
    """
    return StreamIterator(_StreamState(model, prompts, params, overrides, request_id))


def astream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                     request_id: Optional[str] = None, **overrides: Any) -> AsyncStreamIterator:
    """The asyncio version of :func:`stream_parallel`: ``async for event in ...``.

    Arguments are checked at once; the prompts are submitted on the first iteration, from
    the running event loop. ``await it.aclose()`` cancels the rest.
    """
    return AsyncStreamIterator(_StreamState(model, prompts, params, overrides, request_id))
