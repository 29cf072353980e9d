"""classify: P(label | text) for every label, from the labels' scored log-likelihoods.

Each text is formatted into a prompt; every label is scored as the continuation of that
prompt (see scoring.py); the probabilities are the softmax over the labels' total (or
per-token mean) log-likelihoods, so they sum to 1 over the labels given. All texts and
labels run as one request on the Model's batch: a text's prompt is decoded once.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence as _SequenceABC
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union, overload

import numpy as np

from .chat import chat_mode, conversation
from .errors import ErrorCode, ParamError
from .generate import ModelLike, open_model
from .core.inputs import PreparedPrompt, ScoringPrompt, prepare, prompt_list
from .model import Model
from .progress import make_progress
from .results import Score
from .scoring import ContinuationTokens, ScoringPromptsFor, run_scoring, split_boundary
from .templates import ChatTemplate

Template = Union[str, Callable[[str], str]]
NORMALIZE = ("sum", "mean")

DEFAULT_TEMPLATE = "Classify the text into one of these labels: {labels}.\n\nText: {text}\nLabel: "
"""The prompt for plain (chat=False) classification; the label is scored right after it."""
DEFAULT_CHAT_TEMPLATE = "Classify the text into one of these labels: {labels}. Answer with the label only.\n\nText: {text}"
"""The user's message for chat=True; the label is scored as the assistant's whole answer."""

_FIELD = re.compile(r"\{(text|labels)\}")


@dataclass(frozen=True)
class Classification:
    """One text's label probabilities."""

    text: str
    label: Optional[str]
    """The most likely label (the first of equals); None when ``error`` is set."""
    probs: Dict[str, float]
    """label -> probability, in the order the labels were given; they sum to 1 (NaN on error)."""
    scores: List[Score]
    """Each label's :class:`Score` as a continuation of ``prompt``, in label order."""
    prompt: str
    """The prompt the labels were scored after (chat mode: the rendered conversation)."""
    error: Optional[str] = None
    """Why this text could not be classified (say, longer than the model's n_ctx)."""
    error_code: Optional[ErrorCode] = None
    """The same as a code for programs (see ErrorCode); None when ``error`` is None."""


class Classifications(_SequenceABC):
    """The classifications of a call, in text order, with the probabilities as one array."""

    def __init__(self, items: List[Classification], labels: List[str]) -> None:
        self._items = items
        self.labels: List[str] = labels
        """The labels, in the order of ``probs``' columns."""
        self.probs: np.ndarray = np.array([[c.probs[lab] for lab in labels] for c in items],
                                          dtype=np.float64).reshape(len(items), len(labels))
        """texts x labels probabilities (float64); a failed text's row is NaN."""

    @overload
    def __getitem__(self, i: int) -> Classification: ...

    @overload
    def __getitem__(self, i: slice) -> List[Classification]: ...

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Classification]:
        return iter(self._items)

    def __repr__(self) -> str:
        failed = sum(c.error is not None for c in self._items)
        return f"Classifications({len(self._items)} texts, labels={self.labels!r}, failed={failed})"


def classify(model: ModelLike, texts: Union[str, Sequence[str]], labels: Sequence[str], *,
             template: Optional[Template] = None, chat: bool = False, system: Optional[str] = None,
             normalize: str = "sum", chat_template: Optional[str] = None, progress: Optional[bool] = None,
             request_id: Optional[str] = None) -> Classifications:
    """Classifies every text over ``labels`` with exact probabilities (no sampling).

    Args:
        model: a :class:`Model`, a path to a .gguf file, or a ``llama_cpp.Llama``.
        texts: one text or a sequence of texts.
        labels: the label strings, at least one, no duplicates.
        template: formats a text into the prompt: a str whose ``{text}`` (required) and
            ``{labels}`` (the labels joined by ", ") are filled in, or a function of the
            text. Default: :data:`DEFAULT_TEMPLATE` (:data:`DEFAULT_CHAT_TEMPLATE` in chat
            mode). Plain mode appends each label to the prompt as is (whitespace ending
            the prompt moves to the label, see :func:`parallel_gen.score`).
        chat: put the formatted text in a user turn through the model's chat template and
            score each label as the assistant's whole answer: the label followed by the
            template's end-of-turn marker, so a label that is the start of another is
            not favoured.
        system: a system message (implies chat=True).
        normalize: "sum" (softmax over the labels' total log-likelihoods: the probability
            of the exact label string) or "mean" (over per-token means, which favours long
            labels less).
        chat_template: None for the model's template, else Jinja text or a llama.cpp
            built-in name (implies chat=True).
        progress: a progress bar on stderr (texts classified); None shows it when stderr
            is a terminal.
        request_id: a name for this call in log lines.

    Returns:
        :class:`Classifications`: one :class:`Classification` per text, in order, plus
        ``.labels`` and ``.probs`` (a texts x labels numpy array). A text that cannot be
        scored gets ``error`` set, ``label`` None and NaN probabilities; the others are
        unaffected.

    Raises:
        TypeError, ValueError: malformed arguments (no labels, a duplicate label, a label
            that tokenizes to nothing, a template without ``{text}``, ...), before any work.
        GenerationError: llama.cpp failed fatally while decoding.
    """
    text_list = prompt_list(texts)
    options = classify_options(labels, template=template, chat=chat, system=system, normalize=normalize,
                               chat_template=chat_template)
    bar = make_progress(progress, len(text_list))  # checks progress before the model loads
    made: List[Classifier] = []  # the Classifier of the Model the scoring prompts were built for

    def build(m: Model) -> List[ScoringPrompt]:
        made[:] = [Classifier(m, options)]
        return [made[0].scoring_prompt(t, f"texts[{i}]") for i, t in enumerate(text_list)]

    prompts_for = ScoringPromptsFor(build)
    with open_model(model, prompts_for.n_ctx) as m, bar as on_step:
        built = prompts_for(m)  # sets made[0]
        return _classified(m, made[0], text_list, built, on_step, request_id)


def classify_texts(model: Model, texts: List[str], options: "ClassifyOptions", *, known: Optional["KnownRows"] = None,
                   progress: Optional[bool] = None, request_id: Optional[str] = None) -> Classifications:
    """:func:`classify` on an open Model with checked options; ``known`` hands over the
    prompts a sizing already tokenized (compare sizes one Model to all its templates), so
    a text is tokenized once."""
    classifier = Classifier(model, options)
    built = [classifier.scoring_prompt(t, f"texts[{i}]", None if known is None else functools.partial(known, i))
             for i, t in enumerate(texts)]
    with make_progress(progress, len(texts)) as on_step:
        return _classified(model, classifier, texts, built, on_step, request_id)


def _classified(model: Model, classifier: "Classifier", texts: List[str], built: List[ScoringPrompt],
                on_step: Any, request_id: Optional[str]) -> Classifications:
    scores = run_scoring(model, built, request_id=request_id, on_step=on_step)
    items = [classifier.result(t, sp, s) for t, sp, s in zip(texts, built, scores)]
    return Classifications(items, classifier.options.labels)


@dataclass(frozen=True)
class ClassifyOptions:
    """classify's checked arguments (see :func:`classify`)."""

    labels: List[str]
    format: Callable[[str], str]
    """A text to its prompt (plain mode) or user message (chat mode)."""
    chat: bool
    system: Optional[str]
    normalize: str
    chat_template: Optional[str]
    template: Optional[Template] = None
    """The template as given (None: the default), for run records."""


def classify_options(labels: Sequence[str], *, template: Optional[Template] = None, chat: bool = False,
                     system: Optional[str] = None, normalize: str = "sum",
                     chat_template: Optional[str] = None) -> ClassifyOptions:
    """Checks classify's arguments before any model is opened.

    Raises:
        TypeError, ValueError: as :func:`classify` does.
    """
    label_list = _label_list(labels)
    if normalize not in NORMALIZE:
        raise ParamError(f"normalize={normalize!r}: must be one of {', '.join(map(repr, NORMALIZE))}", "normalize")
    chat = chat_mode(chat, system, chat_template)
    fmt = _formatter(template, DEFAULT_CHAT_TEMPLATE if chat else DEFAULT_TEMPLATE, label_list)
    return ClassifyOptions(label_list, fmt, chat, system, normalize, chat_template, template)


Known = Callable[[str], Optional[PreparedPrompt]]
"""Looks a prompt text up among those already tokenized (None: not there)."""

KnownRows = Callable[[int, str], Optional[PreparedPrompt]]
"""Looks text number i's prompt text up among those already tokenized (None: not there)."""


def _unknown(prompt: str) -> Optional[PreparedPrompt]:
    return None


class Classifier:
    """classify one text at a time, for callers that stream texts (the classify file job):
    ``scoring_prompt`` turns a text into its ScoringPrompt, ``result`` its Scores into a Classification."""

    def __init__(self, model: Model, options: ClassifyOptions) -> None:
        self.options = options
        self._build = (_ChatJobs(model, options.labels, options.system, options.chat_template) if options.chat
                       else _PlainJobs(model, options.labels))

    def scoring_prompt(self, text: str, where: str, known: Optional[Known] = None) -> ScoringPrompt:
        """The text's prompt and every label's tokens. ValueError (naming ``where``, the
        text's place) when the text cannot be put into a prompt. ``known``: the prompt
        as already tokenized (by a file job's sizing), or None to tokenize it here."""
        return self._build.scoring_prompt(self.options.format(text), where, known or _unknown)

    def result(self, text: str, sp: ScoringPrompt, scores: List[Score]) -> Classification:
        """The text's Classification from its labels' Scores (in label order)."""
        return _classification(text, sp.prompt, self.options.labels, scores, self.options.normalize)


def label_probabilities(scores: Sequence[Score], normalize: str = "sum") -> np.ndarray:
    """Softmax over the scores' total (``"sum"``) or per-token mean (``"mean"``) logprobs."""
    x = np.array([s.logprob if normalize == "sum" else s.mean_logprob for s in scores], dtype=np.float64)
    x = np.exp(x - x.max())
    return x / x.sum()


def _classification(text: str, prompt: str, labels: List[str], scores: List[Score], normalize: str) -> Classification:
    failed = next((s for s in scores if s.error), None)
    if failed is not None:
        return Classification(text, None, {lab: math.nan for lab in labels}, scores, prompt, failed.error,
                              failed.error_code)
    p = label_probabilities(scores, normalize)
    return Classification(text, labels[int(np.argmax(p))], dict(zip(labels, p.tolist())), scores, prompt)


class _PlainJobs:
    """Plain prompts: each label is the continuation of the formatted text."""

    def __init__(self, model: Model, labels: List[str]) -> None:
        self._model = model
        self._labels = labels
        self._tokens = ContinuationTokens(model)

    def scoring_prompt(self, prompt: str, where: str, known: Known) -> ScoringPrompt:
        head = split_boundary(prompt, "")[0]
        ids = [self._tokens.get(split_boundary(prompt, lab)[1], f"label {lab!r} (after the prompt of {where})")
               for lab in self._labels]
        return ScoringPrompt(known(head) or prepare(self._model, head), ids)


class _ChatJobs:
    """Chat prompts: the text in a user turn, each label as the assistant's answer."""

    def __init__(self, model: Model, labels: List[str], system: Optional[str], chat_template: Optional[str]) -> None:
        self._model = model
        self._template = ChatTemplate(model, chat_template)
        self._system = system
        tokens = ContinuationTokens(model)
        end = self._end_of_turn(model)
        # The generation prompt is kept whole (no whitespace moved): it is exactly what a
        # generating model sees before its answer.
        self._ids = [tokens.get(lab, f"label {lab!r}") + end for lab in labels]

    def _end_of_turn(self, model: Model) -> List[int]:
        if self._template.end_of_turn_token is not None:
            return [self._template.end_of_turn_token]
        if self._template.end_of_turn:
            return model.tokenize(self._template.end_of_turn, add_special=False, parse_special=True)
        return []

    def scoring_prompt(self, user: str, where: str, known: Known) -> ScoringPrompt:
        try:
            prompt = self._template.render(conversation(user, self._system))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return ScoringPrompt(known(prompt) or prepare(self._model, prompt), self._ids)


def _label_list(labels: Any) -> List[str]:
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"labels must be a list of str, got a single {type(labels).__name__}: "
                        "write labels=['positive', 'negative']")
    try:
        items = list(labels)
    except TypeError:
        raise TypeError(f"labels must be a list of str, got {type(labels).__name__}") from None
    if not items:
        raise ValueError("labels is empty: give at least one label")
    seen = set()
    for j, lab in enumerate(items):
        if not isinstance(lab, str):
            raise TypeError(f"labels[{j}] must be a str, got {type(lab).__name__}")
        if lab == "":
            raise ValueError(f"labels[{j}] is empty: a label must have text to score")
        if lab in seen:
            raise ValueError(f"labels[{j}]={lab!r} is a duplicate: each label must be given once")
        seen.add(lab)
    return items


def _formatter(template: Optional[Template], default: str, labels: List[str]) -> Callable[[str], str]:
    if template is None:
        template = default
    if callable(template):
        fn = template

        def call(text: str) -> str:
            out = fn(text)
            if not isinstance(out, str):
                raise TypeError(f"template() must return a str, got {type(out).__name__}")
            return out
        return call
    if not isinstance(template, str):
        raise TypeError(f"template must be a str or a function of the text, got {type(template).__name__}")
    if "{text}" not in template:
        raise ValueError(f"template={template!r} has no {{text}} field: the text would not be in the prompt")
    joined = ", ".join(labels)
    # One pass, so braces inside the text or the labels are never read as fields.
    return lambda text: _FIELD.sub(lambda mt: text if mt.group(1) == "text" else joined, template)
