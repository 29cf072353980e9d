"""Streaming: events as tokens arrive, from a plain or an async iterator.

Both iterators reach the Model's shared engine through a client (parallel_gen.core.client)
and read it through a stream :class:`~parallel_gen.core.collector.Collector`;
closing one (or dropping it, or breaking out of its loop) cancels its sequences and
frees their KV cache.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple

from .core.client import AsyncClient, Client
from .core.collector import Collector
from .generate import ModelLike, open_model
from .core.inputs import Params, PreparedPrompt, Prompts, check_params_against, param_list, prepare_all, prompt_items, \
    prompt_list
from .model import Model
from .params import SamplingParams
from .results import Output, StreamEvent
from .core.runner import Item, Share
from .errors import ParamError, ParamTypeError

if TYPE_CHECKING:
    from .tools import ToolPlan

__all__ = ["AsyncStreamIterator", "StreamEvent", "StreamIterator", "astream_parallel", "stream_collector",
           "stream_parallel"]

WHOLE = 2**31 - 1
"""The stream_interval of a reader that wants only a sequence's first token (its time)
and then its end: a whole response read through the stream path (the server's)."""


def check_stream_interval(value: Any) -> int:
    """``value`` checked as a stream_interval: an int from 1 (every token) to WHOLE."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamTypeError(f"stream_interval must be an int, got {type(value).__name__} {value!r}",
                             "stream_interval")
    if not 1 <= value <= WHOLE:
        raise ParamError(f"stream_interval={value}: must be from 1 (every token) to {WHOLE}", "stream_interval")
    return value


def stream_collector(model: Model, prompts: List[PreparedPrompt], params: List[SamplingParams], *,
                     tools: Optional["ToolPlan"] = None, keep_outputs: bool = False) -> Tuple[Collector, List[Item]]:
    """A stream's collector (a prompt that cannot run has its failed events ready) and
    the items to submit; the params are checked against the model first."""
    check_params_against(model, params)
    collector = Collector(model, tools=tools, stream=True, keep_outputs=keep_outputs)
    items: List[Item] = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        collector.expect(i, prompt.text, p.n, len(prompt.tokens))
        mine, failure = prompt_items(model, i, prompt, p)
        if failure is not None:
            collector.fail(i, failure)
        items.extend(mine)
    return collector, items


class StreamIterator(Iterator[StreamEvent]):
    """Iterator of :class:`StreamEvent`; ``close()`` (or ``with``) cancels what is left."""

    def __init__(self, collector: Collector, items: List[Item],
                 owned: Optional["contextlib.AbstractContextManager[Model]"] = None,
                 request_id: Optional[str] = None, stream_interval: int = 1) -> None:
        self.collector = collector
        self._owned = owned
        self._client = Client(collector.model, request_id)
        self._client.submit(items, stream=True, stream_interval=check_stream_interval(stream_interval))

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> StreamEvent:
        try:
            ev = self.collector.next_event(self._client)
        except BaseException:
            self.close()  # Ctrl-C or a failure: cancel, then let it propagate
            raise
        if ev is None:
            self.close()
            raise StopIteration
        return ev

    def close(self) -> None:
        self.collector.done = True
        self._client.close()
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.__exit__(None, None, None)

    def __enter__(self) -> "StreamIterator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Abandoned: cancel without waiting (this may run on any thread, even the engine's).
        with contextlib.suppress(Exception):
            self._client.close_soon()


class AsyncStreamIterator(AsyncIterator[StreamEvent]):
    """Async iterator of :class:`StreamEvent`; ``await aclose()`` cancels what is left."""

    def __init__(self, collector: Collector, items: List[Item],
                 owned: Optional["contextlib.AbstractContextManager[Model]"] = None,
                 request_id: Optional[str] = None, stream_interval: int = 1) -> None:
        self.collector = collector
        self._items: Optional[List[Item]] = items
        self._interval = check_stream_interval(stream_interval)
        self._owned = owned
        self._client = AsyncClient(collector.model, request_id)
        self.share: Optional[Share] = None
        """Set before the first iteration: the group whose fair turns these sequences take."""

    def __aiter__(self) -> "AsyncStreamIterator":
        return self

    async def __anext__(self) -> StreamEvent:
        if self._items is not None:  # submitted on first use, inside the running loop
            items, self._items = self._items, None
            self._client.submit(items, stream=True, share=self.share, stream_interval=self._interval)
        try:
            ev = await self.collector.anext_event(self._client)
        except BaseException:
            await self.aclose()
            raise
        if ev is None:
            await self.aclose()
            raise StopAsyncIteration
        return ev

    def take_output(self, index: int, sample: int) -> Optional[Output]:
        """A finished sequence's whole Output, when its collector keeps them (the server's)."""
        return self.collector.take_output(index, sample)

    async def aclose(self) -> None:
        self.collector.done = True
        await self._client.aclose()
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.__exit__(None, None, None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close_soon()


def _state(model: ModelLike, prompts: Prompts, params: Params, overrides: Dict[str, Any]
           ) -> Tuple[Collector, List[Item], Optional["contextlib.AbstractContextManager[Model]"]]:
    texts = prompt_list(prompts)
    per_prompt = param_list(params, overrides, len(texts))
    opened = open_model(model)
    m = opened.__enter__()
    try:
        collector, items = stream_collector(m, prepare_all(m, texts), per_prompt)
    except BaseException:
        opened.__exit__(None, None, None)
        raise
    return collector, items, (None if m is model else opened)


def stream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                    request_id: Optional[str] = None, stream_interval: int = 1, **overrides: Any) -> StreamIterator:
    """Like :func:`generate_parallel`, but yields :class:`StreamEvent` as tokens arrive.

    Events of different prompts interleave in generation order; each prompt's (sample's)
    last event has ``finished=True`` and its finish reason. The prompts start decoding
    at once. Closing the iterator (``close()``, leaving a ``with`` block, or dropping
    it) cancels the prompts still running and frees their KV cache.

    ``stream_interval``: a sequence's event carries its new tokens once this many have
    come (its first token at once; the rest with its finished event), as SGLang's
    ``--stream-interval``: fewer events, less work per token for the reader
    (with hundreds of streams, an event loop's); 1 (default): every token. The texts
    and tokens are the same whatever the interval.
    """
    interval = check_stream_interval(stream_interval)
    collector, items, owned = _state(model, prompts, params, overrides)
    return StreamIterator(collector, items, owned, request_id, interval)


def astream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                     request_id: Optional[str] = None, stream_interval: int = 1,
                     **overrides: Any) -> AsyncStreamIterator:
    """The asyncio version of :func:`stream_parallel`: ``async for event in ...``.

    Arguments are checked at once; the prompts are submitted on the first iteration, from
    the running event loop. ``await it.aclose()`` cancels the rest.
    """
    interval = check_stream_interval(stream_interval)
    collector, items, owned = _state(model, prompts, params, overrides)
    return AsyncStreamIterator(collector, items, owned, request_id, interval)
