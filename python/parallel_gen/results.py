"""Result types: one Completion per prompt, gathered in a BatchResult with BatchStats."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence as _SequenceABC
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Union, overload

import numpy as np

from .errors import ErrorCode, Failure

FinishReason = str  # "stop" | "length" | "tool_calls" | "error"


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the tools offered (``chat_parallel(..., tools=...)``)."""

    id: str
    """Unique id (random): the ``tool_call_id`` of the tool's result message."""
    name: str
    """The function called."""
    arguments: str
    """Its arguments, as JSON object text (as OpenAI's API gives them)."""

    @property
    def parsed_arguments(self) -> Dict[str, Any]:
        """The arguments as a dict."""
        return json.loads(self.arguments)

    def to_openai(self) -> Dict[str, Any]:
        """The call as OpenAI's API writes it (an assistant message's ``tool_calls`` item)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Logprob:
    """A token and its log-probability under the model's raw distribution."""

    token_id: int
    token: str
    """The token's text (empty for control tokens)."""
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability, with the most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: List[Logprob]
    """The ``SamplingParams.logprobs`` most likely tokens at that position, best first."""


@dataclass(frozen=True)
class Output:
    """One generated sample of a prompt."""

    text: str
    """Generated text, always valid UTF-8; a stop string that ended it is not included."""
    token_ids: List[int]
    """Generated token ids; a final EOG or stop token is included."""
    finish_reason: FinishReason
    """"stop" (end-of-generation token, stop string or stop token), "length" (max_tokens,
    or the sequence's context is full), "tool_calls" (the reply is tool calls, see
    ``tool_calls``) or "error" (see ``error``)."""
    stop_reason: Union[str, int, None] = None
    """The stop string or the token id that ended it; None otherwise."""
    error: Optional[str] = None
    """Why it failed, when finish_reason is "error"."""
    logprobs: Optional[List[TokenLogprobs]] = None
    """Per generated token, when SamplingParams.logprobs is set."""
    error_code: Optional[ErrorCode] = None
    """Why it failed, as a code for programs (see ErrorCode), when finish_reason is "error"."""
    tool_calls: Optional[List[ToolCall]] = None
    """With tools offered: the calls of the reply (finish_reason "tool_calls"), else [];
    a reply cut short ("length") keeps the calls it holds whole. None when no tools were
    offered."""
    content: Optional[str] = None
    """With tools offered: the reply's text besides its calls (``text`` is all of it, as
    generated). None when no tools were offered."""

    @classmethod
    def failed(cls, failure: Failure) -> "Output":
        """The output of a prompt that did not run."""
        return cls("", [], "error", None, failure.message, None, failure.code)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Output":
        """The inverse of ``dataclasses.asdict`` (the result cache stores that as JSON)."""
        lps = d.get("logprobs")
        if lps is not None:
            lps = [TokenLogprobs(t["token_id"], t["token"], t["logprob"], [Logprob(**a) for a in t["top"]])
                   for t in lps]
        code = d.get("error_code")
        calls = d.get("tool_calls")
        if calls is not None:
            calls = [ToolCall(**c) for c in calls]
        return cls(d["text"], list(d["token_ids"]), d["finish_reason"], d["stop_reason"], d["error"], lps,
                   ErrorCode(code) if code else None, calls, d.get("content"))

    @property
    def token_logprobs(self) -> Optional[np.ndarray]:
        """The generated tokens' log-probabilities as a float64 array, one per token
        (None without logprobs): ``np.exp(o.token_logprobs)`` gives their probabilities."""
        if self.logprobs is None:
            return None
        return np.fromiter((t.logprob for t in self.logprobs), dtype=np.float64, count=len(self.logprobs))

    @property
    def cumulative_logprob(self) -> Optional[float]:
        """Sum of the generated tokens' log-probabilities (None without logprobs)."""
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclass(frozen=True)
class Completion:
    """The result for one prompt, at position ``index`` of the call's prompts."""

    index: int
    prompt: str
    outputs: List[Output]
    prompt_tokens: int
    """Tokens in the prompt (BOS included when the model adds one)."""

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready data (lists, dicts, str, numbers); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Completion":
        return cls(d["index"], d["prompt"], [Output.from_dict(o) for o in d["outputs"]], d["prompt_tokens"])

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> List[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> Union[str, int, None]:
        return self.outputs[0].stop_reason

    @property
    def error(self) -> Optional[str]:
        return self.outputs[0].error

    @property
    def error_code(self) -> Optional[ErrorCode]:
        return self.outputs[0].error_code

    @property
    def tool_calls(self) -> Optional[List[ToolCall]]:
        return self.outputs[0].tool_calls

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over all outputs."""
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(frozen=True)
class BatchStats:
    """What one call did, and how fast.

    The decode figures are the engine's over the steps the call was running in: exact
    for a call alone; calls running at the same time share steps, and each one's
    figures then include the others' work in those steps.
    """

    prompts: int
    prompt_tokens: int
    """Tokens in all prompts."""
    completion_tokens: int
    """Tokens generated for all prompts."""
    prompt_seconds: float
    """Decode time spent on prompt tokens. A llama_decode call that mixes prompt chunks
    and generation tokens is split between the two by their token counts."""
    generation_seconds: float
    """Decode time spent on generation tokens (see prompt_seconds)."""
    wall_seconds: float
    """Time of the whole call, tokenizing, sampling and Python included."""
    prompt_tokens_per_second: float
    """Prompt tokens decoded per second of prompt_seconds."""
    generation_tokens_per_second: float
    """Tokens generated per second of generation_seconds, all sequences together."""
    decode_calls: int
    """Successful llama_decode calls."""
    decode_retries: int
    """llama_decode calls that found no KV room (returned 1) and were retried smaller."""
    fallback_decodes: int
    """Successful llama_decode calls on a batch split up after a retry."""
    failed: int
    """Prompts that finished with "error"."""
    preemptions: int = 0
    """Live sequences paused (KV dropped, recomputed later) to make room in a shared KV pool."""
    sequence_moves: int = 0
    """Live sequences moved to a lower slot (their KV stream copied) when others finished
    with nothing queued, so the running ones keep consecutive ids: llama.cpp decodes
    sequences with separate KV streams in one micro-batch only then."""
    padding_rows: int = 0
    """Dummy one-token rows decoded to keep every generation step at least
    ``BATCH_INVARIANT_MIN_ROWS`` rows wide (``ModelConfig.batch_invariant``; 0 otherwise)."""
    prefix_tokens_reused: int = 0
    """Prompt tokens not decoded because a prefix shared by several prompts (or the n
    samples of one prompt) was decoded once and its KV copied."""
    cache_hits: int = 0
    """Prompts answered from the result cache, without decoding."""
    cached_prompt_tokens: int = 0
    """Prompt tokens not decoded because the Model's prompt cache held their KV (from
    earlier prompts and outputs, this call's or others')."""
    prompt_cache_hits: int = 0
    """Lookups in the prompt cache that found KV to start from: one per sequence, or one
    for a prefix shared by several waiting sequences (which then count neither)."""
    prompt_cache_misses: int = 0
    """Lookups (with the prompt cache on) that found nothing to start from."""
    prompt_cache_evictions: int = 0
    """Prompt cache entries holding tokens no other KV stream held, dropped for room or
    overwritten (or reused for fewer tokens than were dropped)."""
    host_seconds: float = 0.0
    """Engine time outside llama_decode in the steps of the call: admission, sampling, stop
    checks, results. Added to every decode step: on a fast GPU it decides throughput."""

    backend_sampled_tokens: int = 0
    """Generated tokens sampled in llama.cpp's graph (``ModelConfig.backend_sampling``)
    rather than on the host."""

    host_cache_hits: int = 0
    """Of prompt_cache_hits, those restored from the host tier (``ModelConfig.cache_ram``):
    KV saved to host memory when its stream was needed for another prompt. The others
    started from KV still in a stream."""
    host_cached_tokens: int = 0
    """Of cached_prompt_tokens, those restored from the host tier."""
    host_cache_saves: int = 0
    """Prompt cache entries saved to the host tier before their KV stream was reused."""
    host_cache_evictions: int = 0
    """Host tier entries dropped (least recently used first) to stay within cache_ram."""

    @property
    def host_ms_per_step(self) -> float:
        """host_seconds per decode call, in milliseconds; 0 without decode calls."""
        return 1000.0 * self.host_seconds / self.decode_calls if self.decode_calls else 0.0

    @property
    def prompt_cache_hit_rate(self) -> float:
        """prompt_cache_hits / (hits + misses); 0 when nothing was looked up."""
        return hit_rate(self.prompt_cache_hits, self.prompt_cache_misses)


def hit_rate(hits: int, misses: int) -> float:
    """hits / (hits + misses); 0 when nothing was looked up."""
    return hits / (hits + misses) if hits + misses else 0.0


class BatchResult(_SequenceABC):
    """The completions of one call, in prompt order, plus ``texts`` and ``stats``."""

    def __init__(self, completions: List[Completion], stats: BatchStats) -> None:
        self._completions = completions
        self.stats = stats

    @overload
    def __getitem__(self, i: int) -> Completion: ...
    @overload
    def __getitem__(self, i: slice) -> List[Completion]: ...

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._completions[i]

    def __len__(self) -> int:
        return len(self._completions)

    def __iter__(self) -> Iterator[Completion]:
        return iter(self._completions)

    @property
    def texts(self) -> List[str]:
        """The first output's text of every prompt, in prompt order."""
        return [c.text for c in self._completions]

    def __repr__(self) -> str:
        s = self.stats
        return (f"BatchResult({len(self)} completions, {s.completion_tokens} tokens, "
                f"{s.generation_tokens_per_second:.1f} gen tok/s, {s.failed} failed)")


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


@dataclass(frozen=True)
class Score:
    """The log-likelihood of one continuation given its prompt."""

    logprob: float
    """The total: the sum of ``token_logprobs`` (NaN when ``error`` is set)."""
    token_logprobs: List[float]
    """Each continuation token's log-probability (natural log) given everything before it."""
    token_ids: List[int]
    """The continuation's tokens as scored (after the boundary whitespace was moved)."""
    error: Optional[str] = None
    """Why this prompt could not be scored (say, prompt + continuation longer than n_ctx)."""
    error_code: Optional[ErrorCode] = None
    """The same as a code (see ErrorCode)."""

    @property
    def mean_logprob(self) -> float:
        """The length-normalized log-likelihood: ``logprob`` per token."""
        return self.logprob / len(self.token_ids) if self.token_ids else math.nan
