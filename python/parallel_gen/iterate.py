"""generate_iter: completions of a lazy stream of prompts, in input order, with bounded
look-ahead, through the Model's shared engine thread.

Prompts are pulled from the input only while fewer than ``lookahead`` of them are
submitted but not yet handed back, so memory stays flat in the number of prompts and a
generator of a million prompts is fine. They go to the engine in chunks, each one
request of one client, so they share the batch with any other caller. A prompt that
cannot run becomes an "error" Completion; the iteration goes on.

:class:`OrderedRequests` is the machinery (file jobs, Ray batches and classify jobs run
on it too); :class:`OrderedGeneration` its generating kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Generic, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

from .core.client import Client
from .core.collector import Collector
from .errors import ErrorCode, Failure, ParamError, ParamTypeError
from .generate import ModelLike, cacheable_result, open_model
from .core.inputs import PreparedPrompt, prepare, prompt_items, reject_unordered
from .model import Model
from .params import SamplingParams, SeedRule, check_field_names, own_seed
from .results import Completion
from .core.runner import Item

if TYPE_CHECKING:
    from .result_cache import ResultCache
    from .tools import ToolPlan

logger = logging.getLogger("parallel_gen")

W = TypeVar("W")  # a unit of work of an ordered run
R = TypeVar("R")  # its result

LOOKAHEAD_PER_SLOT = 4
"""Default look-ahead: this many prompts per slot in flight (or finished, waiting for an
earlier prompt): enough to keep every slot busy while a long completion holds the line."""


@dataclass(frozen=True)
class Work:
    """One prompt ready for the engine (seed resolved), or why it cannot run."""

    prompt: str
    params: SamplingParams
    failure: Optional[Failure] = None
    prepared: Optional[PreparedPrompt] = None
    """The prompt tokenized, when the work's maker had to (a file job sizing its context):
    the engine takes these tokens rather than tokenizing it again."""
    cacheable: bool = False
    """Its result is a function of the inputs (greedy, or a seed the user gave): with a
    result cache, looked up first and stored after."""


@dataclass
class IterStats:
    """Counters of an ordered run, readable while it runs (for progress bars)."""

    finished: int = 0
    """Prompts finished (handed back or waiting for an earlier one)."""
    generated_tokens: int = 0
    """Tokens generated for the finished prompts (a scoring run: tokens decoded, prompt and labels)."""
    in_flight: int = 0
    """Prompts submitted and not finished."""


def generate_iter(model: ModelLike, prompts: Iterable[str],
                  params: Union[SamplingParams, Iterable[SamplingParams], None] = None, *,
                  lookahead: Optional[int] = None, request_id: Optional[str] = None,
                  **overrides: Any) -> Iterator[Completion]:
    """Yields one :class:`Completion` per prompt, in input order, reading ``prompts`` lazily.

    Args:
        model: a :class:`Model`, or a path / ``llama_cpp.Llama`` (a Model is opened for
            the iteration and closed when it ends).
        prompts: any iterable of str, a generator included; read only as far as the
            look-ahead allows.
        params: one :class:`SamplingParams` for every prompt, or an iterable of them
            read alongside ``prompts`` (one per prompt).
        lookahead: most prompts submitted but not yet yielded (default: 4 per slot of
            the Model). More keeps slots busy behind a slow prompt; less holds less.
        request_id: a name for log lines.
        **overrides: any SamplingParams field, applied on top of ``params``. With one
            SamplingParams, ``seed=s`` gives prompt i the seed s + i, as
            generate_parallel does.

    A prompt that cannot run (not a str, empty, longer than n_ctx, a params entry that
    is not a SamplingParams) yields a Completion with finish_reason "error"; the
    iteration goes on. Closing the generator (or leaving a loop over it early) cancels
    the prompts in flight and frees their KV.

    Raises:
        TypeError, ValueError: bad arguments, at the call.
        GenerationError: llama.cpp failed fatally, or the Model was closed meanwhile.
    """
    check_field_names(overrides)
    if isinstance(prompts, (str, bytes)):
        raise ParamTypeError("prompts must be an iterable of str; for one prompt pass [prompt]", "prompts")
    reject_unordered("prompts", prompts)
    check_lookahead(lookahead)
    works = _works(iter(prompts), params, overrides)
    opened = open_model(model)
    return _iterate(opened, works, lookahead, request_id)


def check_lookahead(lookahead: Optional[int]) -> None:
    """Raises ValueError unless ``lookahead`` is None or an int >= 1."""
    if lookahead is not None and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1):
        raise ParamError(f"lookahead={lookahead!r}: must be an int >= 1", "lookahead")


def _iterate(opened: Any, works: Iterator[Work], lookahead: Optional[int],
             request_id: Optional[str]) -> Iterator[Completion]:
    with opened as model:
        yield from OrderedGeneration(model, works, lookahead, request_id)


def _works(prompts: Iterator[Any], params: Any, overrides: Dict[str, Any]) -> Iterator[Work]:
    if params is None or isinstance(params, SamplingParams):
        base = (params or SamplingParams()).replace(**overrides)
        rule = SeedRule(base.seed)
        for i, prompt in enumerate(prompts):
            yield _work(prompt, rule.apply(base, i), i)
        return
    if isinstance(params, (str, bytes)):
        raise ParamTypeError("params must be a SamplingParams or an iterable of them", "params")
    reject_unordered("params", params)
    per_prompt = iter(params)
    for i, prompt in enumerate(prompts):
        p = next(per_prompt, None)
        text = prompt if isinstance(prompt, str) else ""
        if not isinstance(p, SamplingParams):
            got = "nothing (params ran out)" if p is None else type(p).__name__
            yield Work(text, SamplingParams(),
                       Failure(ErrorCode.INVALID_PARAM, f"params[{i}] must be a SamplingParams, got {got}"))
            continue
        try:
            p = p.replace(**overrides)
        except (TypeError, ValueError) as e:
            yield Work(text, SamplingParams(), Failure(ErrorCode.INVALID_PARAM, f"params[{i}]: {e}"))
            continue
        yield _work(prompt, own_seed(p), i)


def _work(prompt: Any, params: SamplingParams, i: int) -> Work:
    if not isinstance(prompt, str):
        return Work("", params, Failure(ErrorCode.INVALID_INPUT, f"prompts[{i}] must be a str, got "
                                                                 f"{type(prompt).__name__}"))
    return Work(prompt, params)


class OrderedRequests(Generic[W, R]):
    """A lazy stream of works run on the Model's engine thread, one result per work handed
    back in input order, with at most ``lookahead`` works pulled and not handed back.
    ``close()`` cancels what is in flight.

    The events are read, and results assembled, by a :class:`Collector` (``tools``: the
    outputs' tool calls are read there). Subclasses say what a work is: ``_start`` tells
    the collector what to expect of it and turns it into the engine's sequences (or says
    why it cannot run), ``_take`` builds the result of a completed work from the collector.
    """

    def __init__(self, model: Model, works: Iterator[W], lookahead: Optional[int] = None,
                 request_id: Optional[str] = None, tools: Optional["ToolPlan"] = None) -> None:
        check_lookahead(lookahead)
        self.model = model
        self._client = Client(model, request_id)
        self.collector = Collector(model, tools=tools, on_done=self._done)
        self._works = works
        self.lookahead = lookahead or LOOKAHEAD_PER_SLOT * model.n_parallel
        # Chunks of about one slot-full: few requests in flight (each takes turns in the
        # runner's round-robin), yet enough queued to refill slots as they free.
        self._chunk = max(1, min(model.n_parallel, self.lookahead // 2))
        self._next_in = 0  # index of the next work to pull
        self._next_out = 0  # index of the next result to hand back
        self._exhausted = False
        self.stats = IterStats()

    def __iter__(self) -> Iterator[R]:
        try:
            while True:
                self._refill()
                while self.collector.ready(self._next_out):
                    yield self._pop()
                    self._refill()
                if self._exhausted and self._next_out == self._next_in:
                    return
                self.collector.step(self._client)
        finally:
            self.close()

    def close(self) -> None:
        """Cancels every request still in flight and waits until their KV is freed."""
        n = self._client.in_flight
        self._client.close()
        if n:
            logger.info("ordered run %s: cancelled %d request(s) in flight", self._client.name, n)

    # -- what a work is (subclasses) ----------------------------------------------------
    def _start(self, i: int, work: W) -> Tuple[List[Item], Optional[Failure]]:
        """Tells the collector what to expect of work ``i``; the engine's sequences of it
        (their index is ``i``), or why it cannot run."""
        raise NotImplementedError

    def _take(self, i: int) -> R:
        """The result of completed work ``i`` (its state can be dropped)."""
        raise NotImplementedError

    # -- input side ---------------------------------------------------------------------
    def _refill(self) -> None:
        """Pulls works while the look-ahead has room, one request per chunk; a partial
        chunk only when the slots would otherwise run dry."""
        while not self._exhausted:
            room = self.lookahead - (self._next_in - self._next_out)
            if room <= 0 or (room < self._chunk and self.stats.in_flight >= self.model.n_parallel):
                return
            self._submit_chunk(min(room, self._chunk))

    def _submit_chunk(self, size: int) -> None:
        items: List[Item] = []
        for _ in range(size):
            work = next(self._works, None)
            if work is None:
                self._exhausted = True
                break
            i = self._next_in
            self._next_in += 1
            mine, failure = self._start(i, work)
            if failure is not None:
                self.collector.fail(i, failure)
                self.stats.finished += 1
                continue
            if self.collector.ready(i):  # answered without the engine (the result cache)
                self.stats.finished += 1
                continue
            items.extend(mine)
            self.stats.in_flight += 1
        if items:
            self._client.submit(items)

    # -- output side --------------------------------------------------------------------
    def _done(self, i: int) -> None:
        """The engine finished work ``i`` (the collector's on_done)."""
        self.stats.finished += 1
        self.stats.in_flight -= 1
        self.stats.generated_tokens = self.collector.tokens

    def _pop(self) -> R:
        i = self._next_out
        self._next_out += 1
        return self._take(i)


class OrderedGeneration(OrderedRequests[Work, Completion]):
    """The machinery of generate_iter (and of file jobs): an iterator of Completions in
    the order of ``works``, with at most ``lookahead`` prompts pulled and not yielded.
    A prompt that cannot run is an "error" Completion. ``close()`` cancels what is in flight."""

    def __init__(self, model: Model, works: Iterator[Work], lookahead: Optional[int] = None,
                 request_id: Optional[str] = None, tools: Optional["ToolPlan"] = None,
                 cache: Optional["ResultCache"] = None) -> None:
        super().__init__(model, works, lookahead, request_id, tools)
        self.cache = cache
        self._keys: Dict[int, Tuple[str, SamplingParams]] = {}  # works to store once finished

    def _start(self, i: int, work: Work) -> Tuple[List[Item], Optional[Failure]]:
        self.collector.expect(i, work.prompt, work.params.n)
        if work.failure is not None:
            return [], work.failure
        prepared = work.prepared if work.prepared is not None else prepare(self.model, work.prompt)
        if self.cache is not None and work.cacheable and prepared.failure is None:
            key = self.cache.key(self.model, prepared.text, work.params)
            hit = self.cache.get(key)
            if hit is not None:
                self.collector.put(i, hit)
                return [], None
            self._keys[i] = (key, work.params)
        return prompt_items(self.model, i, prepared, work.params)

    def _take(self, i: int) -> Completion:
        reused = i in self.collector.reused_kv  # (take() forgets it)
        c = self.collector.take(i)
        stored = self._keys.pop(i, None)
        if stored is not None and self.cache is not None \
                and cacheable_result(self.model, c, stored[1], reused_kv=reused):
            self.cache.put(stored[0], c)
        return c
