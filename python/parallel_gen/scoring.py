"""score: the log-likelihood of given continuations after each prompt, teacher-forced.

Tokenization at the prompt/continuation boundary follows evaluation harnesses: the prompt
and the continuation are tokenized separately, and whitespace at the end of the prompt is
moved to the start of the continuation (``"Answer: "`` + ``"yes"`` is scored as
``"Answer:"`` then ``" yes"``), because BPE vocabularies attach a space to the word after
it. The continuation's token ids are in every :class:`Score`, so the split can be checked.

In the engine one prompt is one scoring sequence: its prompt is decoded once, then each
continuation is fed after it with logits on every position and rolled back again; a
one-token continuation costs nothing beyond the prompt. These sequences share the batch
with any other work on the Model (see csrc/scoring.hpp).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._native import _core
from .core.client import Client
from .core.collector import Collector
from .errors import ErrorCode, Failure, GenerationError
from .generate import ModelLike, open_model
from .core.inputs import OncePerModel, Prompts, ScoringPrompt, prepare, prompt_list
from .memory import n_ctx_for_work
from .model import Model
from .progress import OnStep, make_progress
from .results import Score
from .core.runner import Item

Continuations = Union[Sequence[str], Sequence[Sequence[str]]]

__all__ = ["ContinuationTokens", "Continuations", "Score", "ScoringPrompt", "ScoringPromptsFor", "run_scoring", "score",
           "scoring_item", "split_boundary"]


def score(model: ModelLike, prompts: Prompts, continuations: Continuations, *,
          progress: Optional[bool] = None, request_id: Optional[str] = None) -> List[List[Score]]:
    """Scores every continuation after every prompt: log P(continuation | prompt).

    Args:
        model: a :class:`Model`, a path to a .gguf file, or a ``llama_cpp.Llama``.
        prompts: one prompt (str) or a sequence of prompts.
        continuations: one list of str scored after every prompt, or one list per prompt.
        progress: a progress bar on stderr (prompts scored); None shows it when stderr is
            a terminal.
        request_id: a name for this call in log lines.

    Returns:
        Per prompt, in order, one :class:`Score` per continuation, in order. A prompt that
        cannot be scored (prompt + continuation longer than the model's n_ctx, or not valid
        Unicode) gets Scores whose ``error`` says why; the other prompts are unaffected.

    Raises:
        TypeError, ValueError: malformed arguments, an empty continuation list, or a
            continuation that is empty or tokenizes to nothing; before any work is done.
        GenerationError: llama.cpp failed fatally while decoding.
    """
    texts = prompt_list(prompts)
    per_prompt = _continuation_lists(continuations, len(texts))
    bar = make_progress(progress, len(texts))  # checks progress before the model loads

    def build(m: Model) -> List[ScoringPrompt]:
        tokens = ContinuationTokens(m)
        built = []
        for i, (prompt, conts) in enumerate(zip(texts, per_prompt)):
            ids = [tokens.get(split_boundary(prompt, c)[1], f"continuation {j} ({c!r}) of prompt {i}")
                   for j, c in enumerate(conts)]
            built.append(ScoringPrompt(prepare(m, split_boundary(prompt, "")[0]), ids))
        return built

    scoring_prompts = ScoringPromptsFor(build)
    with open_model(model, scoring_prompts.n_ctx) as m, bar as on_step:
        return run_scoring(m, scoring_prompts(m), request_id=request_id, on_step=on_step)


class ScoringPromptsFor(OncePerModel[List[ScoringPrompt]]):
    """The scoring prompts of a call, built once per Model; ``n_ctx`` sizes a Model opened
    from a path to them (the longest prompt plus the longest continuation), not 4096."""

    def n_ctx(self, model: Model) -> int:
        prompts = self(model)
        longest = max((len(p.prepared.tokens) for p in prompts), default=1)
        longest_cont = max((len(c) for p in prompts for c in p.continuations), default=1)
        return n_ctx_for_work(longest, longest_cont, complete=True, n_ctx_train=model.n_ctx_train)


def split_boundary(prompt: str, continuation: str) -> Tuple[str, str]:
    """(prompt, continuation) with the prompt's trailing whitespace moved to the continuation."""
    head = prompt.rstrip()
    return head, prompt[len(head):] + continuation


class ContinuationTokens:
    """Tokenizes continuations (no BOS, special-token text left as text), once each."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._cache: Dict[str, List[int]] = {}

    def get(self, text: str, what: str) -> List[int]:
        """The token ids of ``text``; ValueError naming ``what`` when there are none."""
        ids = self._cache.get(text)
        if ids is None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{what} is not valid Unicode text: {e}") from None
            ids = self._cache[text] = self._model.tokenize(text, add_special=False, parse_special=False)
        if not ids:
            raise ValueError(f"{what} tokenizes to no tokens: there is nothing to score")
        return ids


def run_scoring(model: Model, prompts: List[ScoringPrompt], *, request_id: Optional[str] = None,
                on_step: Optional[OnStep] = None) -> List[List[Score]]:
    """Scores validated prompts on the model's engine, sharing its batch with other callers;
    ``on_step(prompts done, prompts, None)`` after engine steps (a progress bar)."""
    step = None if on_step is None else (lambda done, total, _tokens: on_step(done, total, None))
    collector = Collector(model, on_step=step)
    items: List[Item] = []
    for i, sp in enumerate(prompts):
        collector.expect_scores(i, sp)
        if not sp.continuations:
            continue
        item, failure = scoring_item(model, i, sp)
        if item is None:
            collector.fail(i, failure or Failure(ErrorCode.INVALID_INPUT, "cannot be scored"))
            continue
        items.append(item)
    with Client(model, request_id) as client:
        client.submit(items, ticks=on_step is not None)
        collector.drain(client)
    missing = [i for i in range(len(prompts)) if not collector.ready(i)]
    if missing:
        raise GenerationError(f"internal error: the engine returned no scores for texts {missing[:10]}")
    return [collector.take_scored(i).scores for i in range(len(prompts))]


def scoring_item(model: Model, index: int, sp: ScoringPrompt) -> Tuple[Optional[Item], Optional[Failure]]:
    """The engine's scoring sequence of one scoring prompt (at ``index`` of its request), or why
    it cannot run. It must have continuations."""
    prompt = sp.prepared
    failure = prompt.failure or model.check_tokens(prompt.tokens, sp.continuations)
    if failure is not None:
        return None, failure
    config = _core.SamplingConfig()
    config.continuations = sp.continuations
    return Item(index, 0, prompt.tokens, config), None


def _continuation_lists(continuations: Any, n_prompts: int) -> List[List[str]]:
    """One list of continuations per prompt, from a shared list or one list per prompt."""
    if isinstance(continuations, (str, bytes)):
        raise TypeError("continuations must be a list of str (for every prompt) or one list per prompt, "
                        f"got a single {type(continuations).__name__}: wrap it in a list")
    try:
        items = list(continuations)
    except TypeError:
        raise TypeError(f"continuations must be a list of str or a list of lists, got "
                        f"{type(continuations).__name__}") from None
    if not items:
        raise ValueError("continuations is empty: give at least one continuation to score")
    if all(isinstance(c, str) for c in items):
        _check_strs(items, "continuations")
        return [items] * n_prompts
    if len(items) != n_prompts:
        raise ValueError(f"continuations has {len(items)} lists for {n_prompts} prompts: give one list for all "
                         "prompts, or one per prompt")
    out = []
    for i, conts in enumerate(items):
        if isinstance(conts, (str, bytes)) or not isinstance(conts, Sequence):
            raise TypeError(f"continuations[{i}] must be a list of str, got {type(conts).__name__}")
        conts = list(conts)
        if not conts:
            raise ValueError(f"continuations[{i}] is empty: give at least one continuation for prompt {i}")
        _check_strs(conts, f"continuations[{i}]")
        out.append(conts)
    return out


def _check_strs(items: List[Any], where: str) -> None:
    for j, c in enumerate(items):
        if not isinstance(c, str):
            raise TypeError(f"{where}[{j}] must be a str, got {type(c).__name__}")
        if c == "":
            raise ValueError(f"{where}[{j}] is empty: there is nothing to score")
