"""classify_file: a file of texts in, one row of label probabilities per text out.

The classify job of ``parallel-gen classify``: the same sources, sinks, resume, sizing
and progress as generation (see driver.py's :func:`run_rows`); each text becomes one
scoring sequence (see scoring.py), run with bounded look-ahead in input order. Ray's
BatchRunner runs the same :class:`ClassifyJob` on a Dataset's batches.

Output row: the input's fields, then ``row``, ``label`` (the most likely), one
probability column per label named ``p_<label>`` (in the order the labels were given),
``error`` and ``error_code`` (the ErrorCode's value). An input field named like one of these is carried as ``input_<name>``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..chat import conversation
from ..classification import Classifier, ClassifyOptions, Template, classify_options
from ..core.collector import Scored
from ..errors import ErrorCode, Failure
from ..core.inputs import ScoringPrompt
from ..iterate import OrderedRequests
from ..model import Model
from ..core.runner import Item
from ..scoring import scoring_item, split_boundary
from .driver import JobSummary, PathLike, RowDone, RowJob, open_file_source, run_rows
from .sizing import NOTHING, RowNeeds, SizedContext
from .sources import Columns, InputRow

PROBABILITY_PREFIX = "p_"
"""The probability of label L is the column ``p_L``: one column per label, never one of
``row``, ``label``, ``error``, ``error_code`` (which have no ``p_``), distinct since labels are."""


def probability_column(label: str) -> str:
    """The output column holding ``label``'s probability."""
    return PROBABILITY_PREFIX + label


def output_columns(labels: Sequence[str]) -> Tuple[str, ...]:
    """The columns of a classify row after the input's own fields."""
    return ("row", "label", *map(probability_column, labels), "error", "error_code")


@dataclass(frozen=True)
class _Scoring:
    """One row's ScoringPrompt, or why it has none."""

    scoring_prompt: Optional[ScoringPrompt]
    failure: Optional[Failure] = None


class OrderedScoring(OrderedRequests[_Scoring, Scored]):
    """Scoring prompts run with bounded look-ahead, their Scores handed back in input order."""

    def _start(self, i: int, work: _Scoring) -> Tuple[List[Item], Optional[Failure]]:
        self.collector.expect_scores(i, work.scoring_prompt)
        if work.scoring_prompt is None:
            return [], work.failure or Failure(ErrorCode.INVALID_INPUT, "nothing to score")
        item, failure = scoring_item(self.model, i, work.scoring_prompt)
        return ([item] if item is not None else []), failure

    def _take(self, i: int) -> Scored:
        return self.collector.take_scored(i)


class ClassifyJob(RowJob):
    """classify: every row's text scored over the labels (build it with :func:`classify_job`)."""

    noun = "texts"
    settings_flags = "--labels"
    kind = "classify"

    def __init__(self, options: ClassifyOptions) -> None:
        self.options = options
        self.chat_template = options.chat_template
        self.columns = output_columns(options.labels)
        self._sized: Optional[SizedContext] = None
        self._classifier: Optional[Classifier] = None
        # No label has more tokens than UTF-8 bytes; +2: the chat end-of-turn, a merge at the boundary.
        self._label_bound = max(len(lab.encode("utf-8")) for lab in options.labels) + 2

    def writes_column(self, name: str) -> bool:
        return name in self.columns or name.startswith(PROBABILITY_PREFIX)

    def arguments(self) -> Dict[str, Any]:
        o = self.options
        return {"labels": o.labels, "template": o.template, "chat": o.chat, "system": o.system,
                "normalize": o.normalize, "chat_template": o.chat_template}

    def arrow_schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([(name, pa.int64() if name == "row" else
                           pa.float64() if name.startswith(PROBABILITY_PREFIX) else pa.string())
                          for name in self.columns])

    def describe(self, row: InputRow) -> RowNeeds:
        if row.error is not None or row.prompt is None:
            return NOTHING
        try:
            text = self.options.format(row.prompt)
        except (TypeError, ValueError):
            return NOTHING  # the job reports it as the row's error
        if self.options.chat:
            return RowNeeds(conversation(text, self.options.system), after=self._label_bound)
        # The prompt the classifier tokenizes (sized here once): its trailing whitespace
        # moves into the labels' tokens.
        head, moved = split_boundary(text, "")
        return RowNeeds(prompt=head, after=self._label_bound + len(moved.encode("utf-8")))

    def prepare(self, model: Model, sized: Optional[SizedContext]) -> None:
        self._sized = sized
        self._classifier = Classifier(model, self.options)  # chat without a template fails here

    def ordered(self, model: Model, rows: Iterator[InputRow], lookahead: Optional[int]) -> OrderedScoring:
        return OrderedScoring(model, (self._scoring(model, row) for row in rows), lookahead)

    def _scoring(self, model: Model, row: InputRow) -> _Scoring:
        if row.error is not None or row.prompt is None:
            return _Scoring(None, Failure(ErrorCode.INVALID_INPUT, row.error or f"{row.where}: no text"))
        if self._classifier is None:
            raise RuntimeError("the classify job was not prepared for its Model")
        try:
            sized = self._sized
            sp = self._classifier.scoring_prompt(
                row.prompt, row.where, None if sized is None else lambda prompt: sized.take(row.row, prompt))
        except (TypeError, ValueError) as e:
            return _Scoring(None, Failure(ErrorCode.INVALID_INPUT, str(e)))
        if self._sized is not None:
            longest = max(len(ids) for ids in sp.continuations)
            error = self._sized.check_length(len(sp.prepared.tokens), longest,
                                             f"its longest label ({longest} tokens)")
            if error is not None:
                return _Scoring(None, Failure(ErrorCode.PROMPT_TOO_LONG, f"{row.where}: {error}"))
        return _Scoring(sp)

    def record(self, row: InputRow, result: Scored) -> RowDone:
        rec = self.carried(row.fields)
        labels = self.options.labels
        failure = result.failure
        error = None if failure is None else failure.message
        code = None if failure is None else failure.code
        label: Optional[str] = None
        probs: Dict[str, Optional[float]] = dict.fromkeys(labels)
        if failure is None and result.scoring_prompt is not None and self._classifier is not None:
            c = self._classifier.result(row.prompt or "", result.scoring_prompt, result.scores)
            error, code, label = c.error, c.error_code, c.label
            if error is None:
                probs = dict(c.probs)
        if error is not None and not error.startswith(row.where):
            error = f"{row.where}: {error}"
        rec["row"] = row.row
        rec["label"] = label
        for lab in labels:  # NaN is not JSON: a failed row's probabilities are null
            p = probs[lab]
            rec[probability_column(lab)] = None if p is None or math.isnan(p) else p
        rec["error"] = error
        rec["error_code"] = None if error is None or code is None else code.value
        return RowDone(rec, result.prompt_tokens, 0)


def classify_file(model: Union[Model, PathLike, None], input: Optional[PathLike], output: Optional[PathLike],
                  labels: Sequence[str], *, input_format: str = "auto", output_format: str = "auto",
                  text_column: str = "text", template: Optional[Template] = None, chat: bool = False,
                  system: Optional[str] = None, normalize: str = "sum", chat_template: Optional[str] = None,
                  resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
                  lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None) -> JobSummary:
    """Classifies every text of ``input`` over ``labels`` and writes one output row per
    input row, streamed and resumable as :func:`~parallel_gen.jobs.run_file_job` is.

    Args:
        model, input, output, input_format, output_format, resume, overwrite, progress,
            lookahead, model_options: as for :func:`~parallel_gen.jobs.run_file_job`
            (the context is sized to the texts and the labels).
        labels: the labels, at least one, no duplicates.
        text_column: the input field holding the text (a text file's lines are texts).
        template, chat, system, normalize, chat_template: as for
            :func:`parallel_gen.classify` (``system`` implies ``chat``), so a row's
            probabilities are those ``classify`` gives its text.

    Each output row holds the input row's fields, then ``row`` (the input row number,
    from 0), ``label`` (the most likely), ``p_<label>`` per label (they sum to 1),
    ``error`` and ``error_code`` (the :class:`~parallel_gen.ErrorCode` value). A row that cannot be classified (no text, a text too long for n_ctx)
    has ``error`` set, ``label`` and the probabilities null; the others are unaffected.
    In the summary, ``prompt_tokens`` counts the texts' prompts and
    ``completion_tokens`` is 0 (nothing is generated).

    Raises:
        ValueError, TypeError: bad labels or options (JobInputError: unreadable input,
            a protected or unresumable output), before any row.
        JobInterrupted: Ctrl-C; the rows written are kept.
        GenerationError: llama.cpp failed fatally; the rows written are kept.
    """
    t0 = time.perf_counter()
    job = classify_job(labels, template=template, chat=chat, system=system, normalize=normalize,
                       chat_template=chat_template)
    source, out_path = open_file_source(input, output, input_format, output_format, text_columns(text_column),
                                        progress=progress, lookahead=lookahead, resume=resume, overwrite=overwrite)
    try:
        return run_rows(model, source, out_path, job, output_format=output_format, resume=resume,
                        overwrite=overwrite, progress=progress, lookahead=lookahead, model_options=model_options,
                        t0=t0)
    finally:
        source.close()


def classify_job(labels: Sequence[str], *, template: Optional[Template] = None, chat: bool = False,
                 system: Optional[str] = None, normalize: str = "sum",
                 chat_template: Optional[str] = None) -> ClassifyJob:
    """The classify job for :func:`~parallel_gen.jobs.driver.run_rows` (the CLI runs it on
    its own Source) and Ray's BatchRunner; arguments checked as :func:`parallel_gen.classify`
    checks them."""
    return ClassifyJob(classify_options(labels, template=template, chat=chat, system=system,
                                            normalize=normalize, chat_template=chat_template))


def text_columns(text_column: str) -> Columns:
    """The input columns of a classify job: one text field, no conversations."""
    return Columns(text_column, None, "--text-column / text_column=")


__all__ = ["ClassifyJob", "OrderedScoring", "classify_file", "classify_job", "output_columns", "probability_column",
           "text_columns"]
