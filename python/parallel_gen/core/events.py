"""Typed messages between the engine thread and the callers waiting on it.

The engine thread (runner.py) turns what the C++ engine reports into these frozen
dataclasses and hands them to each request's sink; generate, stream (and any other
surface) dispatch on their type. :class:`SequenceResult` is the one place that reads a
native ``_core.Result``; it converts to the public :class:`~parallel_gen.results.Output`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Tuple, Union

from .._native import _core
from ..errors import ErrorCode
from ..results import FinishReason, Logprob, Output, TokenLogprobs

_FINISH: Dict["_core.Finish", FinishReason] = {
    _core.Finish.stop: "stop", _core.Finish.length: "length", _core.Finish.error: "error",
}

# The public code of each native one (ErrorCode.none has none).
ERROR_CODES: Dict["_core.ErrorCode", ErrorCode] = {
    getattr(_core.ErrorCode, c.value): c for c in ErrorCode if hasattr(_core.ErrorCode, c.value)}

# The engine's raw logprobs of one generated token: (its logprob, [(token, logprob), ...] best first).
RawLogprobs = Tuple[float, List[Tuple[int, float]]]


@dataclass(frozen=True)
class SequenceResult:
    """One finished sequence (one sample of one prompt), as the engine reported it."""

    index: int
    """The prompt's position in its request."""
    sample: int
    """Which of the prompt's SamplingParams.n samples."""
    prompt_tokens: int
    token_ids: List[int]
    text: bytes
    """The generated text as UTF-8 bytes (stream deltas are counted in bytes)."""
    finish_reason: FinishReason
    stop_reason: Union[str, int, None]
    error: Optional[str]
    logprobs: Optional[List[RawLogprobs]]
    error_code: Optional[ErrorCode] = None
    cached_tokens: int = 0
    """Prompt tokens whose KV was reused (prompt cache or shared prefix), not decoded."""

    @property
    def aborted(self) -> bool:
        """Dropped by a fatal decode failure, not finished."""
        return self.error_code is ErrorCode.ABORTED

    @classmethod
    def from_native(cls, r: "_core.Result") -> "SequenceResult":
        stop_reason: Union[str, int, None] = None
        if r.stop_string:
            stop_reason = r.stop_string
        elif r.stop_token >= 0:
            stop_reason = int(r.stop_token)
        raw = r.logprobs
        return cls(index=int(r.index), sample=int(r.sample), prompt_tokens=int(r.n_prompt),
                   token_ids=list(r.tokens), text=r.text, finish_reason=_FINISH[r.finish],
                   stop_reason=stop_reason, error=r.error or None, logprobs=list(raw) if raw else None,
                   error_code=ERROR_CODES.get(r.error_code), cached_tokens=int(r.n_cached))

    def to_output(self, token_text: Callable[[int], str]) -> Output:
        """The public Output; ``token_text`` gives a token's text (for logprobs)."""
        return Output(self.text.decode("utf-8", "replace"), list(self.token_ids), self.finish_reason,
                      self.stop_reason, self.error, self.token_logprobs(token_text), self.error_code)

    def token_logprobs(self, token_text: Callable[[int], str]) -> Optional[List[TokenLogprobs]]:
        """Every generated token's logprobs as public types; None when not asked for."""
        return public_logprobs(self.token_ids, self.logprobs, token_text)


def public_logprobs(token_ids: List[int], raw: Optional[List[RawLogprobs]],
                    token_text: Callable[[int], str]) -> Optional[List[TokenLogprobs]]:
    """The engine's raw logprobs of ``token_ids`` as public types; None when not asked for."""
    if raw is None:
        return None
    return [TokenLogprobs(t, token_text(t), lp, [Logprob(a, token_text(a), alp) for a, alp in top])
            for t, (lp, top) in zip(token_ids, raw)]


@dataclass(frozen=True)
class Delta:
    """New output of a streaming sequence since its previous delta."""

    index: int
    sample: int
    text: bytes
    """Whole UTF-8 characters, never the start of a possible stop string."""
    token_ids: List[int]
    logprobs: Optional[List[RawLogprobs]] = None
    """One per token of ``token_ids``, when the sequence's SamplingParams.logprobs is set."""

    @classmethod
    def from_native(cls, d: "_core.StreamDelta") -> "Delta":
        raw = d.logprobs
        return cls(int(d.index), int(d.sample), d.text, list(d.tokens), list(raw) if raw else None)


@dataclass
class EngineCounters:
    """The engine's counters, summed over the steps a request was active in."""

    decode_calls: int = 0
    decode_retries: int = 0
    fallback_decodes: int = 0
    preemptions: int = 0
    sequence_moves: int = 0
    padding_rows: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0
    cached_prompt_tokens: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    prompt_cache_evictions: int = 0
    kv_copies: int = 0
    host_cache_hits: int = 0
    host_cached_tokens: int = 0
    host_cache_saves: int = 0
    host_saved_tokens: int = 0
    host_cache_evictions: int = 0
    host_restore_failures: int = 0
    host_save_seconds: float = 0.0
    host_restore_seconds: float = 0.0
    generated_tokens: int = 0
    backend_sampled_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    host_seconds: float = 0.0

    @classmethod
    def from_native(cls, counters: "_core.Counters") -> "EngineCounters":
        """From ``_core.Engine.counters()``; a field missing on either side is a bug."""
        return cls(**{f.name: getattr(counters, f.name) for f in fields(cls)})

    def add(self, other: "EngineCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def since(self, earlier: "EngineCounters") -> "EngineCounters":
        """What was counted after ``earlier`` (a copy of these counters taken then)."""
        return EngineCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})


@dataclass(frozen=True)
class SequenceFinished:
    """A sequence of the request finished (with a result, possibly an "error" one)."""

    result: SequenceResult


@dataclass(frozen=True)
class SequenceDelta:
    """Streaming requests only: new text and tokens of one sequence."""

    delta: Delta


@dataclass(frozen=True)
class Progress:
    """After each engine step, for requests that asked for it (progress bars)."""

    generated_tokens: int
    """Tokens the engine generated in the steps this request was active in: its own
    tokens when it runs alone; concurrent calls' tokens in those steps are included."""


@dataclass(frozen=True)
class Fatal:
    """llama.cpp failed fatally; the request's sequences are gone."""

    message: str


@dataclass(frozen=True)
class EngineFailed:
    """The engine thread itself failed (a bug); the Model is broken."""

    message: str


@dataclass(frozen=True)
class Closed:
    """The Model was closed while the request was running."""


@dataclass(frozen=True)
class RequestDone:
    """Every sequence of the request has finished (the last event of a request)."""


@dataclass(frozen=True)
class Cancelled:
    """The request was cancelled; nothing more comes."""


EngineEvent = Union[SequenceFinished, SequenceDelta, Progress, Fatal, EngineFailed, Closed, RequestDone, Cancelled]
# Called on the engine thread with each event of its request; it must be quick and must not raise.
Listener = Callable[[EngineEvent], None]
