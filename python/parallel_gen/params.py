"""SamplingParams: how each completion is sampled and when it stops."""

from __future__ import annotations

import contextvars
import dataclasses
import math
import numbers
import re
import secrets
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .constraints import choices_grammar, schema_grammar
from .errors import ParamError, ParamTypeError

_UINT32 = 2**32
_CONSTRAINT_FIELDS = frozenset(("grammar", "json_schema", "choices"))
# The SamplingParams a replace() copies from, while it runs: its compiled grammar is
# reused when the constraint fields are the very same objects (no conversion again).
_REPLACING: "contextvars.ContextVar[Optional[SamplingParams]]" = contextvars.ContextVar("_REPLACING", default=None)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _bad(name: str, value: Any, want: str) -> ParamError:
    return ParamError(f"SamplingParams.{name}={value!r}: {want}", name)


def _need_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise ParamTypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__} {value!r}", name)


def _need_real(name: str, value: Any) -> None:
    if not _is_real(value):
        raise ParamTypeError(f"SamplingParams.{name} must be a number, got {type(value).__name__} {value!r}", name)
    if not math.isfinite(value):
        raise _bad(name, value, "must be finite")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings for one completion (validated on creation).

    Every field can also be passed to :func:`generate_parallel` as a keyword.
    """

    n: int = 1
    """Completions to generate for the prompt (>= 1). They share the prompt's KV (decoded
    once) and each samples with its own seed: sample j uses the prompt's seed plus
    j * 0x9E3779B1 (mod 2**32), so samples never collide with nearby seeds seed + i."""

    max_tokens: int = 128
    """Most tokens to generate (>= 1). A sequence also stops, with finish_reason
    "length", when prompt + output reach the Model's n_ctx."""

    temperature: float = 0.8
    """Softmax temperature (>= 0). 0 means greedy: always the most likely token, and
    top_k, top_p, min_p and seed are then ignored."""

    top_k: int = 40
    """Keep only the k most likely tokens (>= 0; 0 turns it off)."""

    top_p: float = 0.95
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p,
    in (0, 1]; 1 turns it off."""

    min_p: float = 0.05
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]; 0 turns
    it off."""

    repeat_penalty: float = 1.0
    """Divide the logits of tokens seen in the last repeat_last_n tokens (prompt
    included) by this (> 0; 1 turns it off)."""

    repeat_last_n: int = 64
    """Window of the penalties, in tokens (>= 0, or -1 for the whole context)."""

    frequency_penalty: float = 0.0
    """Subtract this times a token's count in the window from its logit (0: off)."""

    presence_penalty: float = 0.0
    """Subtract this from the logit of every token present in the window (0: off)."""

    seed: Optional[int] = None
    """RNG seed in [0, 2**32). With one SamplingParams for a whole call, prompt i uses
    seed + i (mod 2**32); a per-prompt SamplingParams uses its seed as given. None:
    fresh randomness on every call."""

    stop: Tuple[str, ...] = ()
    """Strings that end the completion when they appear in its text, even across token
    boundaries. The stop string itself is not included in the text."""

    stop_token_ids: Tuple[int, ...] = ()
    """Token ids that end the completion. The stop token is in token_ids, not in text."""

    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (for benchmarks and fixed-length
    outputs)."""

    grammar: Optional[str] = None
    """A GBNF grammar (llama.cpp's format, start symbol ``root``) the output must follow.
    At most one of grammar, json_schema and choices."""

    json_schema: Union[Mapping[str, Any], str, None] = None
    """A JSON schema (dict or JSON text) the output must match; converted to a grammar
    with llama-cpp-python's converter."""

    choices: Optional[Tuple[str, ...]] = None
    """The output is exactly one of these strings (unless max_tokens cuts it short)."""

    logprobs: Optional[int] = None
    """Report log-probabilities: for every generated token its own and those of the
    ``logprobs`` most likely tokens (0 to 20). They are the log-softmax of the model's
    raw logits, before logit bias, penalties, grammar, temperature and truncation (as
    vLLM reports by default)."""

    logit_bias: Optional[Mapping[int, float]] = None
    """Added to the logits of the given token ids before sampling (-inf bans a token)."""

    cache_prompt: bool = True
    """Start from the longest prefix of the prompt whose KV the Model's prompt cache holds
    (from earlier prompts and their outputs), and leave this prompt's KV there when it
    ends. False (llama-server's ``cache_prompt: false``): the prompt is decoded whole, on
    its own, and its KV is dropped when it ends. Without effect when the Model was opened
    with ``prompt_cache=False``."""

    grammar_triggers: Tuple[str, ...] = ()
    """Makes the grammar (or json_schema, choices) lazy: it constrains nothing until one
    of these regular expressions (ECMAScript syntax, searched in the generated text)
    matches, then applies from the start of the match's first group (or of the whole
    match) on, as llama.cpp's lazy grammars do. Tool calls with tool_choice "auto" use it:
    free text, until a call starts."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        _need_int("n", self.n)
        if self.n < 1:
            raise _bad("n", self.n, "must be >= 1")
        _need_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, "must be >= 1")
        _need_real("temperature", self.temperature)
        if self.temperature < 0:
            raise _bad("temperature", self.temperature, "must be >= 0 (0 is greedy)")
        _need_int("top_k", self.top_k)
        if self.top_k < 0:
            raise _bad("top_k", self.top_k, "must be >= 0 (0 turns it off)")
        _need_real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        _need_real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        _need_real("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise _bad("repeat_penalty", self.repeat_penalty, "must be > 0 (1 turns it off)")
        _need_int("repeat_last_n", self.repeat_last_n)
        if self.repeat_last_n < -1:
            raise _bad("repeat_last_n", self.repeat_last_n, "must be >= 0, or -1 for the whole context")
        _need_real("frequency_penalty", self.frequency_penalty)
        _need_real("presence_penalty", self.presence_penalty)
        if self.seed is not None:
            _need_int("seed", self.seed)
            if not 0 <= self.seed < _UINT32:
                raise _bad("seed", self.seed, "must be in [0, 2**32)")
        set_(self, "stop", _as_str_tuple(self.stop, "stop"))
        set_(self, "stop_token_ids", _as_int_tuple(self.stop_token_ids))
        for name in ("ignore_eos", "cache_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ParamTypeError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}", name)
        set_(self, "_gbnf", self._constraint_grammar())
        set_(self, "grammar_triggers", _as_str_tuple(self.grammar_triggers, "grammar_triggers"))
        if self.grammar_triggers:
            if self._gbnf is None:  # type: ignore[attr-defined]
                raise _bad("grammar_triggers", self.grammar_triggers, "need a grammar, json_schema or choices")
            for pattern in self.grammar_triggers:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise _bad("grammar_triggers", self.grammar_triggers,
                               f"{pattern!r} is not a valid regular expression ({e})") from None
        if self.logprobs is not None:
            _need_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= 20:
                raise _bad("logprobs", self.logprobs, "must be in [0, 20] (or None for no log-probabilities)")
        if self.logit_bias is not None:
            set_(self, "logit_bias", _as_bias(self.logit_bias))
        # Store plain Python types (numpy scalars and the like would leak into results).
        for name in ("n", "max_tokens", "top_k", "repeat_last_n"):
            set_(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            set_(self, name, float(getattr(self, name)))
        if self.seed is not None:
            set_(self, "seed", int(self.seed))

    def _constraint_grammar(self) -> Optional[str]:
        source = _REPLACING.get()
        if source is not None and all(getattr(self, f) is getattr(source, f) for f in _CONSTRAINT_FIELDS):
            return source._gbnf  # type: ignore[attr-defined]
        given = [f for f in ("grammar", "json_schema", "choices") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ParamError(f"SamplingParams: give at most one of grammar, json_schema and choices, got {given}",
                             given[-1])
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise ParamTypeError(f"SamplingParams.grammar must be GBNF text, got {type(self.grammar).__name__}",
                                     "grammar")
            if not self.grammar.strip():
                raise _bad("grammar", self.grammar, "must not be empty")
            return self.grammar
        if self.json_schema is not None:
            if not isinstance(self.json_schema, (str, Mapping)):
                raise ParamTypeError(f"SamplingParams.json_schema must be a dict or JSON text, "
                                     f"got {type(self.json_schema).__name__}", "json_schema")
            try:
                return schema_grammar(self.json_schema)
            except ValueError as e:
                raise ParamError(f"SamplingParams.json_schema: {e}", "json_schema") from None
        if self.choices is not None:
            items = _as_str_tuple(self.choices, "choices")
            if not items:
                raise _bad("choices", self.choices, "must hold at least one string")
            object.__setattr__(self, "choices", items)
            return choices_grammar(items)
        return None

    @property
    def compiled_grammar(self) -> Optional[str]:
        """The GBNF grammar the output follows (from grammar, json_schema or choices)."""
        return self._gbnf  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed (validated again; the grammar is converted
        again only when grammar, json_schema or choices change)."""
        check_field_names(changes, "SamplingParams field")
        token = _REPLACING.set(self)
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _REPLACING.reset(token)

    def to_native(self, seed: int) -> "_core.SamplingConfig":
        """The engine's sampling configuration of one sample, seeded with ``seed``."""
        from ._native import _core  # on use: the CLI builds its options without loading llama.cpp

        c = _core.SamplingConfig()
        c.max_tokens = self.max_tokens
        c.temperature = self.temperature
        c.top_k = self.top_k
        c.top_p = self.top_p
        c.min_p = self.min_p
        c.repeat_penalty = self.repeat_penalty
        c.repeat_last_n = self.repeat_last_n
        c.frequency_penalty = self.frequency_penalty
        c.presence_penalty = self.presence_penalty
        c.seed = seed
        c.stop = list(self.stop)
        c.stop_token_ids = list(self.stop_token_ids)
        c.ignore_eos = self.ignore_eos
        c.grammar = self.compiled_grammar or ""
        c.grammar_triggers = list(self.grammar_triggers)
        c.logit_bias = sorted(self.logit_bias.items()) if self.logit_bias else []
        c.logprobs = -1 if self.logprobs is None else self.logprobs
        c.cache_prompt = self.cache_prompt
        return c


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def check_field_names(names: Any, what: str = "sampling option") -> None:
    """TypeError naming every key of ``names`` that is not a SamplingParams field."""
    unknown = sorted(set(names) - FIELD_NAMES)
    if unknown:
        raise ParamTypeError(f"unknown {what}(s): {', '.join(unknown)}; valid: {', '.join(sorted(FIELD_NAMES))}",
                             unknown[0])


class SeedRule:
    """The one seed rule of a call: with one seed ``s`` for many prompts (or rows), item
    ``i`` samples with seed ``s + i`` (mod 2**32), so items differ yet the call repeats;
    no seed: a random ``s``, drawn once per call."""

    def __init__(self, seed: Optional[int]) -> None:
        self.start = seed if seed is not None else secrets.randbits(32)

    def seed(self, i: int) -> int:
        return (self.start + i) % _UINT32

    def apply(self, params: "SamplingParams", i: int) -> "SamplingParams":
        return params.replace(seed=self.seed(i))


def own_seed(params: "SamplingParams") -> "SamplingParams":
    """A per-prompt SamplingParams keeps its own seed; one without gets fresh randomness."""
    return params if params.seed is not None else params.replace(seed=secrets.randbits(32))

SAMPLE_SEED_STRIDE = 0x9E3779B1  # odd, ~2**32 / golden ratio: spreads the samples' seeds


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a prompt whose seed is ``seed``."""
    return (seed + sample * SAMPLE_SEED_STRIDE) % _UINT32


def _as_str_tuple(value: Union[str, Sequence[str], None], name: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ParamTypeError(f"SamplingParams.{name} must be a str or a sequence of str, got {value!r}", name) from None
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ParamTypeError(f"SamplingParams.{name}[{i}] must be a str, got {type(s).__name__} {s!r}", name)
        if s == "":
            raise _bad(name, items, "must not hold empty strings")
    return items


def _as_bias(value: Any) -> Dict[int, float]:
    if not isinstance(value, Mapping):
        raise ParamTypeError(f"SamplingParams.logit_bias must be a mapping of token id to bias, got "
                             f"{type(value).__name__}", "logit_bias")
    out: Dict[int, float] = {}
    for tok, bias in value.items():
        if not _is_int(tok) or tok < 0:
            raise _bad("logit_bias", dict(value), f"keys are token ids >= 0, got {tok!r}")
        if not _is_real(bias) or math.isnan(bias) or bias == math.inf:
            raise _bad("logit_bias", dict(value), f"biases are finite numbers or -inf, got {bias!r}")
        out[int(tok)] = float(bias)
    return out


def _as_int_tuple(value: Union[int, Sequence[int], None]) -> Tuple[int, ...]:
    if value is None:
        return ()
    if _is_int(value):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ParamTypeError(f"SamplingParams.stop_token_ids must be a sequence of int, got {value!r}",
                             "stop_token_ids") from None
    for i, t in enumerate(items):
        if not _is_int(t):
            raise ParamTypeError(f"SamplingParams.stop_token_ids[{i}] must be an int, got {type(t).__name__} {t!r}",
                                 "stop_token_ids")
        if t < 0:
            raise _bad("stop_token_ids", items, f"token ids are >= 0, got {t}")
    return tuple(int(t) for t in items)
