"""generate_parallel: many prompts, one batched decode loop."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Set, Union

from ._native import llama_cpp
from .result_cache import open_cache
from .core.client import Client
from .core.collector import Collector, StepCallback
from .errors import GenerationError, ParamTypeError
from .core.events import EngineCounters
from .core.inputs import (OncePerModel, Params, PreparedPrompt, Prompts, check_params_against, deterministic,
                     param_list, prepare_all, prompt_items, prompt_list, read_once)
from .memory import n_ctx_for_work
from .model import Model
from .params import SamplingParams
from .progress import make_progress
from .results import BatchResult, BatchStats, Completion
from .core.runner import Item

if TYPE_CHECKING:
    from .result_cache import ResultCache
    from .tools import ToolPlan

logger = logging.getLogger("parallel_gen")

ModelLike = Union[Model, str, "os.PathLike[str]", "llama_cpp.Llama"]


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
        cache: a directory, a Redis URL (``redis://host:6379/0``, shared by every process
            using it) or a :class:`ResultCache`, caching the results of
            deterministic prompts (greedy, or an explicit seed): a repeated prompt with the
            same parameters on the same model file is answered without decoding.
        **overrides: any SamplingParams field, applied on top of ``params``.

    Returns:
        A :class:`BatchResult`: one :class:`Completion` per prompt, in prompt order.
        A prompt that cannot run (empty, or longer than the sequence context) gets a
        Completion with finish_reason "error" and an ``error_code``; the other prompts
        are unaffected.

    Raises:
        TypeError, ValueError: bad arguments, before any work is done.
        FileNotFoundError, ModelLoadError: ``model`` is a path that cannot be loaded.
        GenerationError: llama.cpp failed fatally (or the Model was closed meanwhile);
            carries the completions finished so far.
        KeyboardInterrupt: Ctrl-C stops the call within about one decode step; the Model
            is cleaned up and stays usable.
        ImportError: progress=True and tqdm is not installed.
    """
    texts = prompt_list(prompts)
    params = read_once(params)
    per_prompt = param_list(params, overrides, len(texts))
    cacheable = deterministic(params, overrides, len(texts))
    bar = make_progress(progress, len(texts))  # checks `progress` before the model loads
    result_cache = open_cache(cache)
    prepared = OncePerModel(lambda m: prepare_all(m, texts))
    try:
        # A Model opened here gets a context sized to these prompts, not the 4096 default.
        with open_model(model, sized_to(prepared, [p.max_tokens for p in per_prompt])) as m, bar as on_step:
            return run_batch(m, prepared(m), per_prompt, on_step=on_step, request_id=request_id,
                             cache=result_cache, cacheable=cacheable)
    finally:
        if result_cache is not None and result_cache is not cache:
            result_cache.close()  # opened from a path for this call


def sized_to(prepared: Callable[[Model], List[PreparedPrompt]], max_tokens: List[int]) -> Callable[[Model], int]:
    """``n_ctx(model)`` for a call whose prompts are all known: the longest prompt plus the
    largest max_tokens (see memory.n_ctx_for_work)."""
    def n_ctx(m: Model) -> int:
        longest = max((len(p.tokens) for p in prepared(m)), default=0)
        return n_ctx_for_work(longest, max(max_tokens, default=1), complete=True, n_ctx_train=m.n_ctx_train)

    return n_ctx


def open_model(model: ModelLike, n_ctx: Optional[Callable[[Model], int]] = None) -> "contextlib.AbstractContextManager[Model]":
    """The Model to use, as a context manager that closes it only if this call opened it.
    A path is opened with ``n_ctx(model)`` tokens per sequence when given, else the
    default; a ``llama_cpp.Llama`` lends its weights."""
    if isinstance(model, Model):
        return contextlib.nullcontext(model)
    if isinstance(model, (str, os.PathLike)):
        return _closing(Model.open_sized(model, n_ctx) if n_ctx is not None else Model(model))
    if isinstance(model, llama_cpp.Llama):
        return _closing(Model.from_llama(model))
    raise ParamTypeError(f"model must be a parallel_gen.Model, a path or a llama_cpp.Llama, got "
                         f"{type(model).__name__}", "model")


@contextlib.contextmanager
def _closing(model: Model) -> Iterator[Model]:
    try:
        yield model
    finally:
        model.close()


def run_batch(model: Model, prompts: List[PreparedPrompt], params: List[SamplingParams],
              on_step: Optional[StepCallback] = None, *, request_id: Optional[str] = None,
              cache: Optional["ResultCache"] = None, cacheable: Optional[List[bool]] = None,
              tools: Optional["ToolPlan"] = None) -> BatchResult:
    """Runs prepared prompts and per-prompt params (seeds set) through the model's engine.

    The request joins the Model's running batch (shared with any other callers) and this
    thread waits for its results. ``on_step`` (if given) is called after engine steps,
    for progress reporting. With a ``cache``, prompts whose ``cacheable`` flag is set are
    looked up first and stored after. With ``tools`` (chat_parallel's), every output's
    tool calls are read.
    """
    t0 = time.perf_counter()
    check_params_against(model, params)
    gather = Collector(model, tools=tools, on_step=on_step)
    keys: List[Optional[str]] = [None] * len(prompts)
    hits: Set[int] = set()
    items: List[Item] = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        gather.expect(i, prompt.text, p.n, len(prompt.tokens))
        if cache is not None and (cacheable is None or cacheable[i]):
            keys[i] = cache.key(model, prompt.text, p)
            hit = cache.get(keys[i])
            if hit is not None:
                gather.put(i, hit)
                hits.add(i)
                continue
        mine, failure = prompt_items(model, i, prompt, p)
        if failure is not None:
            gather.fail(i, failure)
        items.extend(mine)
    with Client(model, request_id) as client:
        logger.info("request %s: %d prompts, %d sequences", client.name, len(prompts), len(items))
        req = client.submit(items, ticks=on_step is not None)
        gather.drain(client)
    completions = gather.completed()
    if len(completions) != len(prompts):
        raise GenerationError(f"internal error: the engine returned {len(completions)} of {len(prompts)} prompts",
                              completions)
    if cache is not None:
        for i, c in enumerate(completions):
            if (keys[i] is not None and i not in hits
                    and cacheable_result(model, c, params[i], reused_kv=i in gather.reused_kv)):
                cache.put(keys[i], c)
    stats = batch_stats(completions, req.counters, time.perf_counter() - t0, cache_hits=len(hits))
    logger.info("request %s: done, %d tokens in %.2f s", client.name, stats.completion_tokens, stats.wall_seconds)
    return BatchResult(completions, stats)


def cacheable_result(model: Model, c: Completion, params: SamplingParams, *, reused_kv: bool) -> bool:
    """Whether a completion is a function of the prompt, the params and the numerics alone,
    the one rule of every result cache's writer: its prefill did not start from reused KV
    (``reused_kv``: the prompt cache, a shared prefix; its output depends on what ran
    before, so only whole prefills' outputs are kept), it is not an error, and it was not
    cut off by this Model's context (n_ctx is capacity, not part of the cache key, so an
    output the context ended would be wrong under a larger one)."""
    if reused_kv:
        return False
    for o in c.outputs:
        if o.finish_reason == "error":
            return False
        if o.finish_reason == "length" and len(o.token_ids) < params.max_tokens:
            return False  # the context filled up before max_tokens
    return True


def batch_stats(completions: List[Completion], c: EngineCounters, wall: float, cache_hits: int = 0) -> BatchStats:
    ps, gs = c.prompt_seconds, c.generation_seconds
    return BatchStats(
        prompts=len(completions),
        prompt_tokens=sum(x.prompt_tokens for x in completions),
        completion_tokens=sum(x.completion_tokens for x in completions),
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
        padding_rows=int(c.padding_rows),
        prefix_tokens_reused=int(c.prefix_tokens_reused),
        cache_hits=cache_hits,
        cached_prompt_tokens=int(c.cached_prompt_tokens),
        prompt_cache_hits=int(c.prompt_cache_hits),
        prompt_cache_misses=int(c.prompt_cache_misses),
        prompt_cache_evictions=int(c.prompt_cache_evictions),
        host_seconds=c.host_seconds,
        backend_sampled_tokens=int(c.backend_sampled_tokens),
        host_cache_hits=int(c.host_cache_hits),
        host_cached_tokens=int(c.host_cached_tokens),
        host_cache_saves=int(c.host_cache_saves),
        host_cache_evictions=int(c.host_cache_evictions),
    )

