"""generate_parallel: many prompts, one batched decode loop."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import (TYPE_CHECKING, Any, Callable, Deque, Generic, Iterator, List, Optional, Sequence, Set, Tuple,
                    TypeVar, Union)

from ._native import _core, llama_cpp
from .cache import open_cache
from .errors import GenerationError
from .events import (Cancelled, Closed, EngineCounters, EngineEvent, Fatal, Progress, RequestDone, SequenceFinished,
                     SequenceResult)
from .memory import n_ctx_for_prompts
from .model import Model
from .params import FIELD_NAMES, SamplingParams, sample_seed
from .progress import make_progress
from .results import BatchResult, BatchStats, Completion, Output
from .runner import Item, Request

if TYPE_CHECKING:
    from .cache import ResultCache

logger = logging.getLogger("parallel_gen")

ModelLike = Union[Model, str, "os.PathLike[str]", "llama_cpp.Llama"]
Prompts = Union[str, Sequence[str]]
Params = Union[SamplingParams, Sequence[SamplingParams], None]
# Called after every engine step with (prompts finished, prompts in total, tokens generated so far).
StepCallback = Callable[[int, int, int], None]


def generate_parallel(model: ModelLike, prompts: Prompts, params: Params = None, *,
                      progress: Optional[bool] = None, request_id: Optional[str] = None,
                      cache: Union[None, str, "os.PathLike[str]", "ResultCache"] = None,
                      **overrides: Any) -> BatchResult:
    """Generates a completion for every prompt, decoding them together in one batch.

    Args:
        model: a :class:`Model`; a path to a .gguf file (a Model is opened and closed
            inside the call); or a ``llama_cpp.Llama`` (its weights are shared).
        prompts: one prompt (str) or a sequence of prompts.
        params: one :class:`SamplingParams` for all prompts, or one per prompt.
        progress: a tqdm bar on stderr (finished prompts, generated tokens/s); None shows
            it only when stderr is a terminal and tqdm is installed.
        request_id: a name for this call in log lines (default: a random id).
        cache: a directory (or a :class:`ResultCache`) caching the results of
            deterministic prompts (greedy, or an explicit seed): a repeated prompt with the
            same parameters on the same model file is answered without decoding.
        **overrides: any SamplingParams field, applied on top of ``params``.

    Returns:
        A :class:`BatchResult`: one :class:`Completion` per prompt, in prompt order.
        A prompt that cannot run (empty, or longer than the sequence context) gets a
        Completion with finish_reason "error"; the other prompts are unaffected.

    Raises:
        TypeError, ValueError: bad arguments, before any work is done.
        FileNotFoundError, ModelLoadError: ``model`` is a path that cannot be loaded.
        GenerationError: llama.cpp failed fatally; carries the completions finished so far.
        KeyboardInterrupt: Ctrl-C stops the call within about one decode step; the Model
            is cleaned up and stays usable.
        ImportError: progress=True and tqdm is not installed.
    """
    prompt_list = _prompt_list(prompts)
    params = _read_once(params)
    param_list = _param_list(params, overrides, len(prompt_list))
    cacheable = _deterministic(params, overrides, len(prompt_list))
    bar = make_progress(progress, len(prompt_list))  # checks `progress` before the model loads
    result_cache = open_cache(cache)
    try:
        # A Model opened here gets a context sized to these prompts, not the 4096 default.
        with _open(model, n_ctx_for_prompts(prompt_list, [p.max_tokens for p in param_list])) as m, \
                bar as on_step:
            return run_batch(m, prompt_list, param_list, on_step=on_step, request_id=request_id,
                             cache=result_cache, cacheable=cacheable)
    finally:
        if result_cache is not None and result_cache is not cache:
            result_cache.close()  # opened from a path for this call


def _prompt_list(prompts: Prompts) -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError("prompts must be str or a sequence of str, got bytes: decode it first")
    items = _ordered_list("prompts", prompts, "str or a sequence of str")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return items


def reject_unordered(name: str, value: Any) -> None:
    """Results come back in input order, so the input needs one: a dict would be iterated
    for its keys, a set in an arbitrary order. Raises TypeError for both."""
    if isinstance(value, Mapping):
        raise TypeError(f"{name} must be a sequence (a list or tuple), got {type(value).__name__}: to keep "
                        f"ids with a dict, pass list(d.values()); results come back in that order")
    if isinstance(value, AbstractSet):
        raise TypeError(f"{name} must be a sequence (a list or tuple), got {type(value).__name__}, which has no "
                        f"order to match results to: pass a list, e.g. sorted(...)")


def _ordered_list(name: str, value: Any, expected: str) -> List[Any]:
    """``value`` as a list, if it is an ordered iterable; else TypeError naming ``name``."""
    reject_unordered(name, value)
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None


def _param_list(params: Params, overrides: dict, n: int) -> List[SamplingParams]:
    """One SamplingParams per prompt, seeds resolved."""
    unknown = sorted(set(overrides) - FIELD_NAMES)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}; valid: {', '.join(sorted(FIELD_NAMES))}")
    if params is None or isinstance(params, SamplingParams):
        base = (params or SamplingParams()).replace(**overrides) if overrides else (params or SamplingParams())
        # One seed for the call: prompt i gets seed + i, so prompts differ yet the call repeats.
        if base.seed is None:
            return [base.replace(seed=secrets.randbits(32)) for _ in range(n)]
        return [base.replace(seed=(base.seed + i) % 2**32) for i in range(n)]
    if isinstance(params, (str, bytes)):
        raise TypeError("params must be a SamplingParams or a sequence of them")
    items = _ordered_list("params", params, "a SamplingParams or a sequence of them")
    if len(items) != n:
        raise ValueError(f"got {len(items)} SamplingParams for {n} prompts: give one, or one per prompt")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        p = p.replace(**overrides) if overrides else p
        out.append(p if p.seed is not None else p.replace(seed=secrets.randbits(32)))
    return out


def _read_once(params: Params) -> Params:
    """An iterable of SamplingParams read into a list, since it is read more than once
    (a generator would be empty the second time); anything else as given."""
    if params is None or isinstance(params, (SamplingParams, str, bytes, Mapping)) or not isinstance(params, Iterable):
        return params  # _param_list reports the wrong types
    return list(params)


def _deterministic(params: Params, overrides: dict, n: int) -> List[bool]:
    """Per prompt: is its result a function of the inputs (greedy, or a seed given)?"""
    def fixed(p: SamplingParams) -> bool:
        p = p.replace(**overrides) if overrides else p
        return p.temperature == 0 or p.seed is not None

    if params is None or isinstance(params, SamplingParams):
        return [fixed(params or SamplingParams())] * n
    return [fixed(p) for p in params]


def _open_model(model: ModelLike, n_ctx: Optional[Callable[[Model], int]] = None) -> Tuple[Model, bool]:
    """The Model to use, and whether this call opened it (and must close it). A path is
    opened with ``n_ctx(model)`` tokens per sequence when given, else the default."""
    if isinstance(model, Model):
        return model, False
    if isinstance(model, (str, os.PathLike)):
        return (Model._sized(model, n_ctx) if n_ctx is not None else Model(model)), True
    if isinstance(model, llama_cpp.Llama):
        return Model.from_llama(model), True
    raise TypeError(f"model must be a parallel_gen.Model, a path or a llama_cpp.Llama, got {type(model).__name__}")


T = TypeVar("T")


class OncePerModel(Generic[T]):
    """``build(model)``, computed once per Model: a call that opens a model from a path
    needs its inputs (rendered prompts, scoring jobs) to size the context, then to run."""

    def __init__(self, build: Callable[[Model], T]) -> None:
        self._build = build
        self._model: Optional[Model] = None
        self._value: Optional[T] = None

    def __call__(self, model: Model) -> T:
        if self._model is not model:
            self._value, self._model = self._build(model), model
        return self._value  # type: ignore[return-value]


@contextlib.contextmanager
def _open(model: ModelLike, n_ctx: Optional[Callable[[Model], int]] = None) -> Iterator[Model]:
    m, owned = _open_model(model, n_ctx)
    try:
        yield m
    finally:
        if owned:
            m.close()


def run_batch(model: Model, prompts: List[str], params: List[SamplingParams],
              on_step: Optional[StepCallback] = None, *, request_id: Optional[str] = None,
              cache: Optional["ResultCache"] = None, cacheable: Optional[List[bool]] = None) -> BatchResult:
    """Runs validated prompts and per-prompt params (seeds set) through the model's engine.

    The request joins the Model's running batch (shared with any other callers) and this
    thread waits for its results. ``on_step`` (if given) is called after engine steps,
    for progress reporting. With a ``cache``, prompts whose ``cacheable`` flag is set are
    looked up first and stored after.
    """
    t0 = time.perf_counter()
    runner = model._require_runner()
    _check_against_model(model, params)
    _core.release_caller_openmp_threads()  # an idle team here would slow the engine's
    gather = _Gather(model, prompts, params)
    name = request_id or new_request_id()
    keys: List[Optional[str]] = [None] * len(prompts)
    items: Deque[Item] = collections.deque()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        if cache is not None and (cacheable is None or cacheable[i]):
            keys[i] = cache.key(model, prompt, p)
            hit = cache.get(keys[i])
            if hit is not None:
                gather.hit(i, hit)
                continue
        mine, error = prompt_items(i, prompt, p)
        if error:
            gather.fail(i, error)
        items.extend(mine)
    events: "queue.SimpleQueue[EngineEvent]" = queue.SimpleQueue()
    req = Request(name, items, events.put, ticks=on_step is not None)
    logger.info("request %s: %d prompts, %d sequences", name, len(prompts), len(items))
    runner.submit(req)
    try:
        while True:
            event = next_event(events)
            if isinstance(event, SequenceFinished):
                gather.add(event.result)
            elif isinstance(event, Progress):
                if on_step is not None:
                    on_step(gather.n_done, len(prompts), event.generated_tokens)
            elif isinstance(event, RequestDone):
                if on_step is not None:  # the request ends before its last step's Progress
                    on_step(gather.n_done, len(prompts), req.counters.generated_tokens)
                break
            elif isinstance(event, Fatal):
                raise GenerationError(fatal_message(event), gather.completed())
            elif isinstance(event, Closed):
                raise GenerationError(CLOSED_MESSAGE, gather.completed())
            elif isinstance(event, Cancelled):  # by another thread holding the request
                raise GenerationError(CANCELLED_MESSAGE, gather.completed())
    except BaseException:
        # Ctrl-C, a failure, anything: leave no sequence or KV of ours behind.
        with contextlib.suppress(RuntimeError):  # the Model was closed meanwhile
            runner.cancel(req).wait()
        raise
    completions = gather.completed()
    assert len(completions) == len(prompts), "engine lost a prompt"
    if cache is not None:
        for i, c in enumerate(completions):
            if keys[i] is not None and i not in gather.hits and not any(o.finish_reason == "error" for o in c.outputs):
                cache.put(keys[i], c)
    stats = _stats(completions, req.counters, time.perf_counter() - t0, cache_hits=len(gather.hits))
    logger.info("request %s: done, %d tokens in %.2f s", name, stats.completion_tokens, stats.wall_seconds)
    return BatchResult(completions, stats)


CLOSED_MESSAGE = "the Model was closed while this call was running"
CANCELLED_MESSAGE = "the request was cancelled while it was running"


def fatal_message(event: Fatal) -> str:
    return f"llama.cpp failed while decoding: {event.message}"


def prompt_items(index: int, prompt: str, params: SamplingParams) -> Tuple[List[Item], Optional[str]]:
    """The engine's sequences for one prompt, one per sample (the engine shares the
    prompt's KV among them); or none and why, for text that is not valid Unicode."""
    try:
        raw = prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        return [], f"the prompt is not valid Unicode text: {e}"
    return [Item(index, j, raw, params._to_native(sample_seed(params.seed, j))) for j in range(params.n)], None


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def next_event(events: "queue.SimpleQueue[EngineEvent]") -> EngineEvent:
    """The next event of a request, waiting as long as it takes."""
    # A short timeout keeps the waiting thread responsive to Ctrl-C.
    while True:
        try:
            return events.get(timeout=0.1)
        except queue.Empty:
            continue


def _check_against_model(model: Model, params: List[SamplingParams]) -> None:
    """Checks what only the model can tell (token ids, grammars), before any work."""
    n_vocab = model.n_vocab
    grammar_ok: dict = {}
    for i, p in enumerate(params):
        for field, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", list(p.logit_bias or ()))):
            bad = [t for t in ids if t >= n_vocab]
            if bad:
                raise ValueError(f"SamplingParams.{field} of prompt {i}: {bad} not in the model's "
                                 f"vocabulary of {n_vocab} tokens")
        g = p.compiled_grammar
        if g is not None:
            if g not in grammar_ok:
                grammar_ok[g] = model._model.grammar_error(g)
            if grammar_ok[g]:
                what = "grammar" if p.grammar is not None else "json_schema" if p.json_schema is not None else "choices"
                raise ValueError(f"SamplingParams.{what} of prompt {i}: llama.cpp rejects the grammar: {grammar_ok[g]}")


class _Gather:
    """Collects the engine's per-sample results into per-prompt Completions."""

    def __init__(self, model: Model, prompts: List[str], params: List[SamplingParams]) -> None:
        self.model = model
        self.prompts = prompts
        self.outputs: List[List[Optional[Output]]] = [[None] * p.n for p in params]
        self.prompt_tokens = [0] * len(prompts)
        self.missing = [p.n for p in params]
        self.n_done = 0
        self.hits: Set[int] = set()

    def hit(self, i: int, c: Completion) -> None:
        self.outputs[i] = list(c.outputs)
        self.prompt_tokens[i] = c.prompt_tokens
        self.missing[i] = 0
        self.n_done += 1
        self.hits.add(i)

    def add(self, r: SequenceResult) -> None:
        self.outputs[r.index][r.sample] = r.to_output(self.model._token_text)
        self.prompt_tokens[r.index] = r.prompt_tokens
        self.missing[r.index] -= 1
        self.n_done += self.missing[r.index] == 0

    def fail(self, i: int, message: str) -> None:
        self.outputs[i] = [Output("", [], "error", None, message) for _ in self.outputs[i]]
        self.missing[i] = 0
        self.n_done += 1

    def completed(self) -> List[Completion]:
        return [Completion(i, self.prompts[i], list(outs), self.prompt_tokens[i])  # type: ignore[arg-type]
                for i, outs in enumerate(self.outputs) if self.missing[i] == 0]


def _stats(completions: List[Completion], c: EngineCounters, wall: float, cache_hits: int = 0) -> BatchStats:
    ps, gs = c.prompt_seconds, c.generation_seconds
    completion_tokens = sum(x.completion_tokens for x in completions)
    return BatchStats(
        prompts=len(completions),
        prompt_tokens=sum(x.prompt_tokens for x in completions),
        completion_tokens=completion_tokens,
        prompt_seconds=ps,
        generation_seconds=gs,
        wall_seconds=wall,
        prompt_tokens_per_second=c.prompt_tokens / ps if ps > 0 else 0.0,
        generation_tokens_per_second=c.generated_tokens / gs if gs > 0 else 0.0,
        decode_calls=int(c.decode_calls),
        decode_retries=int(c.decode_retries),
        fallback_decodes=int(c.fallback_decodes),
        failed=sum(1 for x in completions if any(o.finish_reason == "error" for o in x.outputs)),
        preemptions=int(c.preemptions),
        sequence_moves=int(c.sequence_moves),
        prefix_tokens_reused=int(c.prefix_tokens_reused),
        cache_hits=cache_hits,
        cached_prompt_tokens=int(c.cached_prompt_tokens),
        prompt_cache_hits=int(c.prompt_cache_hits),
        prompt_cache_misses=int(c.prompt_cache_misses),
        prompt_cache_evictions=int(c.prompt_cache_evictions),
    )
