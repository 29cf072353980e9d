"""generate_parallel: many prompts, one batched decode loop."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import Any, Iterator, List, Optional, Sequence, Union

from ._native import _core, llama_cpp
from .errors import GenerationError
from .model import Model
from .params import FIELD_NAMES, SamplingParams
from .results import BatchResult, BatchStats, Completion, Output

ModelLike = Union[Model, str, "os.PathLike[str]", "llama_cpp.Llama"]
Prompts = Union[str, Sequence[str]]
Params = Union[SamplingParams, Sequence[SamplingParams], None]

_FINISH = {_core.Finish.stop: "stop", _core.Finish.length: "length", _core.Finish.error: "error"}


def generate_parallel(model: ModelLike, prompts: Prompts, params: Params = None, **overrides: Any) -> BatchResult:
    """Generates a completion for every prompt, decoding them together in one batch.

    Args:
        model: a :class:`Model`; a path to a .gguf file (a Model is opened and closed
            inside the call); or a ``llama_cpp.Llama`` (its weights are shared).
        prompts: one prompt (str) or a sequence of prompts.
        params: one :class:`SamplingParams` for all prompts, or one per prompt.
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
    """
    prompt_list = _prompt_list(prompts)
    param_list = _param_list(params, overrides, len(prompt_list))
    with _open(model) as m:
        return run_batch(m, prompt_list, param_list)


def _prompt_list(prompts: Prompts) -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError("prompts must be str or a sequence of str, got bytes: decode it first")
    try:
        items = list(prompts)
    except TypeError:
        raise TypeError(f"prompts must be str or a sequence of str, got {type(prompts).__name__}") from None
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return items


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
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be a SamplingParams or a sequence of them, got {type(params).__name__}") from None
    if len(items) != n:
        raise ValueError(f"got {len(items)} SamplingParams for {n} prompts: give one, or one per prompt")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
        p = p.replace(**overrides) if overrides else p
        out.append(p if p.seed is not None else p.replace(seed=secrets.randbits(32)))
    return out


@contextlib.contextmanager
def _open(model: ModelLike) -> Iterator[Model]:
    if isinstance(model, Model):
        yield model
        return
    if isinstance(model, (str, os.PathLike)):
        m = Model(model)
    elif isinstance(model, llama_cpp.Llama):
        m = Model.from_llama(model)
    else:
        raise TypeError(f"model must be a parallel_gen.Model, a path or a llama_cpp.Llama, got {type(model).__name__}")
    try:
        yield m
    finally:
        m.close()


def _error_completion(index: int, prompt: str, message: str) -> Completion:
    return Completion(index, prompt, [Output("", [], "error", None, message)], 0)


def _completion(r: "_core.Result", prompt: str) -> Completion:
    finish = _FINISH[r.finish]
    stop_reason: Union[str, int, None] = None
    if r.stop_string:
        stop_reason = r.stop_string
    elif r.stop_token >= 0:
        stop_reason = int(r.stop_token)
    out = Output(r.text.decode("utf-8", "replace"), list(r.tokens), finish, stop_reason, r.error or None)
    return Completion(int(r.index), prompt, [out], int(r.n_prompt))


def run_batch(model: Model, prompts: List[str], params: List[SamplingParams]) -> BatchResult:
    """Runs validated prompts and per-prompt params (seeds set) through the model's engine."""
    t0 = time.perf_counter()
    with model._lock:
        engine = model._require()
        n_vocab = model.n_vocab
        for i, p in enumerate(params):
            bad = [t for t in p.stop_token_ids if t >= n_vocab]
            if bad:
                raise ValueError(f"SamplingParams.stop_token_ids of prompt {i}: {bad} not in the model's "
                                 f"vocabulary of {n_vocab} tokens")
        done: List[Optional[Completion]] = [None] * len(prompts)
        engine.reset_counters()
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    raw = prompt.encode("utf-8")
                except UnicodeEncodeError as e:
                    done[i] = _error_completion(i, prompt, f"the prompt is not valid Unicode text: {e}")
                    continue
                engine.submit(i, 0, raw, p._to_native(p.seed))
            while engine.has_work():
                finished, fatal = engine.step()
                for r in finished:
                    if not r.aborted:
                        done[r.index] = _completion(r, prompts[r.index])
                if fatal:
                    engine.cancel_all()
                    raise GenerationError(f"llama.cpp failed while decoding: {fatal}",
                                          [c for c in done if c is not None])
        except BaseException:
            # Ctrl-C, a failure, anything: leave no sequence or KV behind.
            engine.cancel_all()
            raise
        counters = engine.counters()
    completions = [c for c in done if c is not None]
    assert len(completions) == len(prompts), "engine lost a prompt"
    return BatchResult(completions, _stats(completions, counters, time.perf_counter() - t0))


def _stats(completions: List[Completion], c: dict, wall: float) -> BatchStats:
    ps, gs = c["prompt_seconds"], c["generation_seconds"]
    completion_tokens = sum(x.completion_tokens for x in completions)
    return BatchStats(
        prompts=len(completions),
        prompt_tokens=sum(x.prompt_tokens for x in completions),
        completion_tokens=completion_tokens,
        prompt_seconds=ps,
        generation_seconds=gs,
        wall_seconds=wall,
        prompt_tokens_per_second=c["prompt_tokens"] / ps if ps > 0 else 0.0,
        generation_tokens_per_second=c["generated_tokens"] / gs if gs > 0 else 0.0,
        decode_calls=c["decode_calls"],
        decode_retries=c["decode_retries"],
        fallback_decodes=c["fallback_decodes"],
        failed=sum(1 for x in completions if x.finish_reason == "error"),
        preemptions=c["preemptions"],
    )
