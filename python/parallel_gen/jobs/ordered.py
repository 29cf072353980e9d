"""generate_iter: completions of a lazy stream of prompts, in input order, with bounded
look-ahead, through the Model's shared engine thread.

Prompts are pulled from the input only while fewer than ``lookahead`` of them are
submitted but not yet handed back, so memory stays flat in the number of prompts and a
generator of a million prompts is fine. They go to the engine in chunks, each one
request of the Model's runner, so they share the batch with any other caller. A prompt
that cannot run becomes an "error" Completion; the iteration goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import secrets
from dataclasses import dataclass
from typing import Any, Deque, Dict, Generic, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

from .._native import _core
from ..errors import GenerationError
from ..events import Cancelled, Closed, EngineEvent, Fatal, RequestDone, SequenceFinished, SequenceResult
from ..generate import (CANCELLED_MESSAGE, CLOSED_MESSAGE, ModelLike, _open_model, fatal_message, new_request_id,
                        next_event, prompt_items, reject_unordered)
from ..model import Model
from ..params import FIELD_NAMES, SamplingParams
from ..results import Completion, Output
from ..runner import Item, Request

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
    error: Optional[str] = None


@dataclass
class _Pending:
    prompt: str
    outputs: List[Optional[Output]]
    prompt_tokens: int = 0


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
    unknown = sorted(set(overrides) - FIELD_NAMES)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}; valid: {', '.join(sorted(FIELD_NAMES))}")
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be an iterable of str; for one prompt pass [prompt]")
    reject_unordered("prompts", prompts)
    check_lookahead(lookahead)
    works = _works(iter(prompts), params, overrides)
    m, owned = _open_model(model)
    return _iterate(m, owned, works, lookahead, request_id)


def check_lookahead(lookahead: Optional[int]) -> None:
    """Raises ValueError unless ``lookahead`` is None or an int >= 1."""
    if lookahead is not None and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1):
        raise ValueError(f"lookahead={lookahead!r}: must be an int >= 1")


def _iterate(model: Model, owned: bool, works: Iterator[Work], lookahead: Optional[int],
             request_id: Optional[str]) -> Iterator[Completion]:
    try:
        yield from OrderedGeneration(model, works, lookahead, request_id)
    finally:
        if owned:
            model.close()


def _works(prompts: Iterator[Any], params: Any, overrides: Dict[str, Any]) -> Iterator[Work]:
    if params is None or isinstance(params, SamplingParams):
        base = (params or SamplingParams()).replace(**overrides)
        start = base.seed if base.seed is not None else secrets.randbits(32)
        for i, prompt in enumerate(prompts):
            yield _work(prompt, base.replace(seed=(start + i) % 2**32), i)
        return
    if isinstance(params, (str, bytes)):
        raise TypeError("params must be a SamplingParams or an iterable of them")
    reject_unordered("params", params)
    per_prompt = iter(params)
    for i, prompt in enumerate(prompts):
        p = next(per_prompt, None)
        if not isinstance(p, SamplingParams):
            got = "nothing (params ran out)" if p is None else type(p).__name__
            yield Work(prompt if isinstance(prompt, str) else "", SamplingParams(),
                       f"params[{i}] must be a SamplingParams, got {got}")
            continue
        try:
            p = p.replace(**overrides)
        except (TypeError, ValueError) as e:
            yield Work(prompt if isinstance(prompt, str) else "", SamplingParams(), f"params[{i}]: {e}")
            continue
        yield _work(prompt, p if p.seed is not None else p.replace(seed=secrets.randbits(32)), i)


def _work(prompt: Any, params: SamplingParams, i: int) -> Work:
    if not isinstance(prompt, str):
        return Work("", params, f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    return Work(prompt, params)


class OrderedRequests(Generic[W, R]):
    """A lazy stream of works run on the Model's engine thread, one result per work handed
    back in input order, with at most ``lookahead`` works pulled and not handed back.
    ``close()`` cancels what is in flight.

    Subclasses say what a work is: ``_start`` turns it into the engine's sequences (or
    says why it cannot run), ``_finished`` keeps a finished sequence's result, ``_failed``
    records a work that did not run, ``_take`` builds the result of a completed work.
    """

    def __init__(self, model: Model, works: Iterator[W], lookahead: Optional[int] = None,
                 request_id: Optional[str] = None) -> None:
        check_lookahead(lookahead)
        self.model = model
        self._runner = model._require_runner()
        self._works = works
        self.lookahead = lookahead or LOOKAHEAD_PER_SLOT * model.n_parallel
        # Chunks of about one slot-full: few requests in flight (each takes turns in the
        # runner's round-robin), yet enough queued to refill slots as they free.
        self._chunk = max(1, min(model.n_parallel, self.lookahead // 2))
        self._name = request_id or new_request_id()
        self._queue: "queue.SimpleQueue[EngineEvent]" = queue.SimpleQueue()
        self._missing: Dict[int, int] = {}  # work index -> sequences not finished yet (0: ready)
        self._requests: Dict[int, Request] = {}
        self._next_in = 0  # index of the next work to pull
        self._next_out = 0  # index of the next result to hand back
        self._exhausted = False
        self.stats = IterStats()

    def __iter__(self) -> Iterator[R]:
        _core.release_caller_openmp_threads()  # an idle team here would slow the engine's
        try:
            while True:
                self._refill()
                while self._missing.get(self._next_out) == 0:
                    yield self._pop()
                    self._refill()
                if self._exhausted and self._next_out == self._next_in:
                    return
                self._handle(next_event(self._queue))
        finally:
            self.close()

    def close(self) -> None:
        """Cancels every request still in flight and waits until their KV is freed."""
        requests, self._requests = list(self._requests.values()), {}
        for req in requests:
            with contextlib.suppress(RuntimeError):  # the Model was closed meanwhile
                self._runner.cancel(req).wait()
        if requests:
            logger.info("ordered run %s: cancelled %d request(s) in flight", self._name, len(requests))

    # -- what a work is (subclasses) ----------------------------------------------------
    def _start(self, i: int, work: W) -> Tuple[List[Item], Optional[str]]:
        """The engine's sequences of work ``i`` (their index is ``i``), or why it cannot run."""
        raise NotImplementedError

    def _finished(self, r: SequenceResult) -> None:
        """Keeps one finished sequence of work ``r.index``."""
        raise NotImplementedError

    def _failed(self, i: int, message: str) -> None:
        """Records that work ``i`` did not run."""
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
        items: Deque[Item] = collections.deque()
        for _ in range(size):
            work = next(self._works, None)
            if work is None:
                self._exhausted = True
                break
            i = self._next_in
            self._next_in += 1
            mine, error = self._start(i, work)
            if error is not None:
                self._failed(i, error)
                self._missing[i] = 0
                self.stats.finished += 1
                continue
            items.extend(mine)
            self._missing[i] = len(mine)
            self.stats.in_flight += 1
        if items:
            req = Request(f"{self._name}/{self._next_in}", items, self._queue.put)
            self._requests[req.id] = req
            self._runner.submit(req)

    # -- output side --------------------------------------------------------------------
    def _handle(self, event: EngineEvent) -> None:
        if isinstance(event, SequenceFinished):
            self._add(event.result)
        elif isinstance(event, RequestDone):
            self._requests = {k: r for k, r in self._requests.items() if r.remaining > 0}
        elif isinstance(event, Fatal):
            raise GenerationError(fatal_message(event), [])
        elif isinstance(event, Closed):
            raise GenerationError(CLOSED_MESSAGE, [])
        elif isinstance(event, Cancelled):
            raise GenerationError(CANCELLED_MESSAGE, [])

    def _add(self, r: SequenceResult) -> None:
        self._finished(r)
        self._missing[r.index] -= 1
        if self._missing[r.index] == 0:
            self.stats.finished += 1
            self.stats.in_flight -= 1

    def _pop(self) -> R:
        i = self._next_out
        del self._missing[i]
        self._next_out += 1
        return self._take(i)


class OrderedGeneration(OrderedRequests[Work, Completion]):
    """The machinery of generate_iter (and of file jobs): an iterator of Completions in
    the order of ``works``, with at most ``lookahead`` prompts pulled and not yielded.
    A prompt that cannot run is an "error" Completion. ``close()`` cancels what is in flight."""

    def __init__(self, model: Model, works: Iterator[Work], lookahead: Optional[int] = None,
                 request_id: Optional[str] = None) -> None:
        super().__init__(model, works, lookahead, request_id)
        self._pending: Dict[int, _Pending] = {}
        self._token_text: Dict[int, str] = {}
        self._checked: Dict[Tuple[Any, ...], Optional[str]] = {}

    def _start(self, i: int, work: Work) -> Tuple[List[Item], Optional[str]]:
        n = work.params.n
        self._pending[i] = _Pending(work.prompt, [None] * n)
        error = work.error or self._check(work.params)
        if error is not None:
            return [], error
        return prompt_items(i, work.prompt, work.params)

    def _check(self, p: SamplingParams) -> Optional[str]:
        """What only the model can tell about a prompt's params (token ids, grammar),
        as a per-prompt error; remembered, since rows of a job mostly repeat params."""
        key = (p.compiled_grammar, p.stop_token_ids, tuple(sorted((p.logit_bias or {}).items())))
        if key not in self._checked:
            n_vocab, error = self.model.n_vocab, None
            for name, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", sorted(p.logit_bias or ()))):
                bad = [t for t in ids if t >= n_vocab]
                if bad and error is None:
                    error = f"SamplingParams.{name}: {bad} not in the model's vocabulary of {n_vocab} tokens"
            if error is None and p.compiled_grammar is not None:
                why = self.model._model.grammar_error(p.compiled_grammar)
                if why:
                    error = f"llama.cpp rejects the grammar: {why}"
            self._checked[key] = error
        return self._checked[key]

    def _finished(self, r: SequenceResult) -> None:
        p = self._pending[r.index]
        p.outputs[r.sample] = r.to_output(self._text)
        p.prompt_tokens = r.prompt_tokens
        self.stats.generated_tokens += len(r.token_ids)

    def _failed(self, i: int, message: str) -> None:
        p = self._pending[i]
        p.outputs = [Output("", [], "error", None, message) for _ in p.outputs]

    def _take(self, i: int) -> Completion:
        p = self._pending.pop(i)
        return Completion(i, p.prompt, p.outputs, p.prompt_tokens)  # type: ignore[arg-type]

    def _text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.model.detokenize([token])
        return text
