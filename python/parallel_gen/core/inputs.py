"""From a call's arguments to the engine's items, the same way for every surface.

- the shapes a caller may pass (:func:`prompt_list`, :func:`ordered_list`);
- one SamplingParams per prompt with the call's seed rule (:func:`param_list`);
- prompts tokenized once (:class:`PreparedPrompt`): sizing a context and submitting
  read the same token ids;
- the engine's sequences of a prompt (:func:`prompt_items`), after the engine's own
  check, so a prompt that cannot run fails at once with its :class:`~parallel_gen.errors.ErrorCode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, List, Optional, Sequence, Tuple, TypeVar, Union

from ..errors import ErrorCode, Failure, ParamError, ParamTypeError
from ..params import SamplingParams, SeedRule, check_field_names, own_seed, sample_seed
from .runner import Item

if TYPE_CHECKING:
    from ..model import Model

Prompts = Union[str, Sequence[str]]
Params = Union[SamplingParams, Sequence[SamplingParams], None]

T = TypeVar("T")


def reject_unordered(name: str, value: Any) -> None:
    """Results come back in input order, so the input needs one: a dict would be iterated
    for its keys, a set in an arbitrary order. Raises TypeError for both."""
    if isinstance(value, Mapping):
        raise ParamTypeError(f"{name} must be a sequence (a list or tuple), got {type(value).__name__}: to keep "
                             f"ids with a dict, pass list(d.values()); results come back in that order", name)
    if isinstance(value, AbstractSet):
        raise ParamTypeError(f"{name} must be a sequence (a list or tuple), got {type(value).__name__}, which has "
                             f"no order to match results to: pass a list, e.g. sorted(...)", name)


def ordered_list(name: str, value: Any, expected: str) -> List[Any]:
    """``value`` as a list, if it is an ordered iterable; else TypeError naming ``name``."""
    reject_unordered(name, value)
    try:
        return list(value)
    except TypeError:
        raise ParamTypeError(f"{name} must be {expected}, got {type(value).__name__}", name) from None


def prompt_list(prompts: Prompts) -> List[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise ParamTypeError("prompts must be str or a sequence of str, got bytes: decode it first", "prompts")
    items = ordered_list("prompts", prompts, "str or a sequence of str")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise ParamTypeError(f"prompts[{i}] must be a str, got {type(p).__name__}", "prompts")
    return items


def read_once(params: Params) -> Params:
    """An iterable of SamplingParams read into a list, since it is read more than once
    (a generator would be empty the second time); anything else as given."""
    if params is None or isinstance(params, (SamplingParams, str, bytes, Mapping)) or not isinstance(params, Iterable):
        return params  # param_list reports the wrong types
    return list(params)


def param_list(params: Params, overrides: Mapping[str, Any], n: int) -> List[SamplingParams]:
    """One SamplingParams per prompt, seeds resolved: one SamplingParams for the call
    follows the SeedRule; per-prompt ones keep their own seed (or get a fresh one)."""
    check_field_names(overrides)
    if params is None or isinstance(params, SamplingParams):
        base = (params or SamplingParams()).replace(**overrides)
        rule = SeedRule(base.seed)
        return [rule.apply(base, i) for i in range(n)]
    if isinstance(params, (str, bytes)):
        raise ParamTypeError("params must be a SamplingParams or a sequence of them", "params")
    items = ordered_list("params", params, "a SamplingParams or a sequence of them")
    if len(items) != n:
        raise ParamError(f"got {len(items)} SamplingParams for {n} prompts: give one, or one per prompt", "params")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, SamplingParams):
            raise ParamTypeError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}", "params")
        out.append(own_seed(p.replace(**overrides) if overrides else p))
    return out


def deterministic(params: Params, overrides: Mapping[str, Any], n: int) -> List[bool]:
    """Per prompt: is its result a function of the inputs (greedy, or a seed given)? The
    answer is read before seeds are filled in (a random seed does not make it so)."""
    def fixed(p: SamplingParams) -> bool:
        p = p.replace(**overrides) if overrides else p
        return p.temperature == 0 or p.seed is not None

    if params is None or isinstance(params, SamplingParams):
        return [fixed(params or SamplingParams())] * n
    return [fixed(p) for p in params]


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt tokenized once, or why it cannot be (text that is not valid Unicode)."""

    text: str
    tokens: List[int]
    failure: Optional[Failure] = None


@dataclass(frozen=True)
class ScoringPrompt:
    """One prompt and the continuations to score after it, tokenized (see split_boundary)."""

    prepared: PreparedPrompt
    """The prompt and its tokens (BOS per the model, special tokens parsed)."""
    continuations: List[List[int]]
    """Token ids of each continuation; none empty."""

    @property
    def prompt(self) -> str:
        return self.prepared.text


def prepare(model: "Model", text: str) -> PreparedPrompt:
    try:
        return PreparedPrompt(text, model.tokenize(text))
    except UnicodeEncodeError as e:
        return PreparedPrompt(text, [], Failure(ErrorCode.INVALID_PROMPT, f"the prompt is not valid Unicode text: {e}"))


def prepare_all(model: "Model", texts: Sequence[str]) -> List[PreparedPrompt]:
    return [prepare(model, t) for t in texts]


def longest(prompts: Sequence[PreparedPrompt]) -> int:
    """The longest prompt in tokens (0 for none)."""
    return max((len(p.tokens) for p in prompts), default=0)


def prompt_items(model: "Model", index: int, prompt: PreparedPrompt,
                 params: SamplingParams) -> Tuple[List[Item], Optional[Failure]]:
    """The engine's sequences for one prompt, one per sample (the engine shares the
    prompt's KV among them); or none and why it cannot run."""
    failure = prompt.failure or model.check_tokens(prompt.tokens)
    if failure is not None:
        return [], failure
    problem = model.check_params(params)
    if problem is not None:
        return [], Failure(ErrorCode.INVALID_PARAM, str(problem))
    return [Item(index, j, prompt.tokens, params.to_native(sample_seed(params.seed, j))) for j in range(params.n)], None


def check_params_against(model: "Model", params: Sequence[SamplingParams]) -> None:
    """Raises the ParamError (naming the prompt) of the first params the model rejects:
    a call's arguments are checked before any work."""
    for i, p in enumerate(params):
        problem = model.check_params(p)
        if problem is not None:
            raise ParamError(f"prompt {i}: {problem}", problem.field)


class OncePerModel(Generic[T]):
    """``build(model)``, computed once per Model: a call that opens a model from a path
    needs its inputs (tokenized prompts, rendered conversations, scoring jobs) to size the
    context, then to run."""

    def __init__(self, build: Callable[["Model"], T]) -> None:
        self._build = build
        self._model: Optional["Model"] = None
        self._value: Optional[T] = None

    def __call__(self, model: "Model") -> T:
        if self._model is not model:
            self._value, self._model = self._build(model), model
        return self._value  # type: ignore[return-value]
