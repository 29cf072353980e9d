"""Streaming: events as tokens arrive, from a plain or an async iterator.

Both iterators reach the Model's shared engine through a client (parallel_gen.client);
closing one (or dropping it, or breaking out of its loop) cancels its sequences and
frees their KV cache.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Deque, Dict, Iterator, List, Optional, Tuple, Union

from .client import AsyncClient, Client
from .events import EngineEvent, RequestDone, SequenceDelta, SequenceFinished, public_logprobs
from .generate import ModelLike, open_model
from .inputs import Params, PreparedPrompt, Prompts, check_params_against, param_list, prepare_all, prompt_items, \
    prompt_list
from .model import Model
from .params import SamplingParams
from .results import TokenLogprobs
from .runner import Item, Share


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
    error_code: Optional[str] = None
    """On a failed last event: the ErrorCode (see Output.error_code)."""
    cached_tokens: int = 0
    """On the last event: prompt tokens whose KV was reused (the Model's prompt cache,
    or a prefix shared with other prompts) rather than decoded for this sample."""


class StreamState:
    """What both iterators share: the work to submit, and engine events turned into
    StreamEvents (each sequence's last event carries only what its deltas had not)."""

    def __init__(self, model: Model, prompts: List[PreparedPrompt], params: List[SamplingParams]) -> None:
        check_params_against(model, params)
        self.model = model
        self.ready: Deque[StreamEvent] = collections.deque()
        self.items: List[Item] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            mine, failure = prompt_items(model, i, prompt, p)
            if failure is not None:
                self.ready.extend(StreamEvent(i, "", [], True, "error", j, None, failure.message,
                                              error_code=failure.code) for j in range(p.n))
            self.items.extend(mine)
        self._sent: Dict[Tuple[int, int], Tuple[int, int]] = {}  # (index, sample) -> (bytes, tokens) sent
        self.done = False

    def event(self, event: EngineEvent) -> Optional[StreamEvent]:
        """The StreamEvent for one engine event; None when it has nothing to show."""
        if isinstance(event, SequenceDelta):
            d = event.delta
            key = (d.index, d.sample)
            sent_bytes, sent_tokens = self._sent.get(key, (0, 0))
            self._sent[key] = (sent_bytes + len(d.text), sent_tokens + len(d.token_ids))
            return StreamEvent(d.index, d.text.decode("utf-8", "replace"), list(d.token_ids), False, sample=d.sample,
                               logprobs=public_logprobs(d.token_ids, d.logprobs, self.model.token_text))
        if isinstance(event, SequenceFinished):
            r = event.result
            sent_bytes, sent_tokens = self._sent.pop((r.index, r.sample), (0, 0))
            raw = r.logprobs[sent_tokens:] if r.logprobs is not None else None
            return StreamEvent(r.index, r.text[sent_bytes:].decode("utf-8", "replace"), r.token_ids[sent_tokens:],
                               True, r.finish_reason, r.sample, r.stop_reason, r.error,
                               public_logprobs(r.token_ids[sent_tokens:], raw, self.model.token_text),
                               r.error_code, r.cached_tokens)
        if isinstance(event, RequestDone):
            self.done = True
        return None  # Progress: nothing to show


class StreamIterator(Iterator[StreamEvent]):
    """Iterator of :class:`StreamEvent`; ``close()`` (or ``with``) cancels what is left."""

    def __init__(self, state: StreamState, owned: Optional["contextlib.AbstractContextManager[Model]"] = None,
                 request_id: Optional[str] = None) -> None:
        self._state = state
        self._owned = owned
        self._client = Client(state.model, request_id)
        self._client.submit(state.items, stream=True)

    def __iter__(self) -> "StreamIterator":
        return self

    def __next__(self) -> StreamEvent:
        st = self._state
        while not st.ready:
            if st.done:
                self.close()
                raise StopIteration
            try:
                ev = st.event(self._client.next().event)
            except BaseException:
                self.close()  # Ctrl-C or a failure: cancel, then let it propagate
                raise
            if ev is not None:
                return ev
        return st.ready.popleft()

    def close(self) -> None:
        self._state.done = True
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

    def __init__(self, state: StreamState, owned: Optional["contextlib.AbstractContextManager[Model]"] = None,
                 request_id: Optional[str] = None) -> None:
        self._state = state
        self._owned = owned
        self._client = AsyncClient(state.model, request_id)
        self._started = False
        self.share: Optional[Share] = None
        """Set before the first iteration: the group whose fair turns these sequences take."""

    def __aiter__(self) -> "AsyncStreamIterator":
        return self

    async def __anext__(self) -> StreamEvent:
        st = self._state
        if not self._started:
            self._started = True  # submitted on first use, inside the running loop
            self._client.submit(st.items, stream=True, share=self.share)
        while not st.ready:
            if st.done:
                await self.aclose()
                raise StopAsyncIteration
            try:
                ev = st.event((await self._client.next()).event)
            except BaseException:
                await self.aclose()
                raise
            if ev is not None:
                return ev
        return st.ready.popleft()

    async def aclose(self) -> None:
        self._state.done = True
        await self._client.aclose()
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.__exit__(None, None, None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close_soon()


def _state(model: ModelLike, prompts: Prompts, params: Params, overrides: Dict[str, Any]
           ) -> Tuple[StreamState, Optional["contextlib.AbstractContextManager[Model]"]]:
    texts = prompt_list(prompts)
    per_prompt = param_list(params, overrides, len(texts))
    opened = open_model(model)
    m = opened.__enter__()
    try:
        state = StreamState(m, prepare_all(m, texts), per_prompt)
    except BaseException:
        opened.__exit__(None, None, None)
        raise
    return state, (None if m is model else opened)


def stream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                    request_id: Optional[str] = None, **overrides: Any) -> StreamIterator:
    """Like :func:`generate_parallel`, but yields :class:`StreamEvent` as tokens arrive.

    Events of different prompts interleave in generation order; each prompt's (sample's)
    last event has ``finished=True`` and its finish reason. The prompts start decoding
    at once. Closing the iterator (``close()``, leaving a ``with`` block, or dropping
    it) cancels the prompts still running and frees their KV cache.
    """
    state, owned = _state(model, prompts, params, overrides)
    return StreamIterator(state, owned, request_id)


def astream_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                     request_id: Optional[str] = None, **overrides: Any) -> AsyncStreamIterator:
    """The asyncio version of :func:`stream_parallel`: ``async for event in ...``.

    Arguments are checked at once; the prompts are submitted on the first iteration, from
    the running event loop. ``await it.aclose()`` cancels the rest.
    """
    state, owned = _state(model, prompts, params, overrides)
    return AsyncStreamIterator(state, owned, request_id)
