"""run_file_job: a file of prompts in, a file of rows out, nothing lost on the way.

Rows are read lazily, generated with bounded look-ahead (OrderedGeneration) and each
written and flushed as soon as it and every row before it are done. A killed job is
continued with ``resume=True``: rows already written are skipped, a torn last row is
redone, and seeds depend on the row number, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Collection, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ..chat import checked_conversation
from ..model import Model
from ..params import SamplingParams
from ..progress import make_progress
from ..results import Completion
from ..templates import ChatTemplate
from ..tools import ToolPlan, ToolRequest, tool_request
from .formats import STDIN, InputFormat, JobInputError, input_format_for, output_format_for
from .ordered import LOOKAHEAD_PER_SLOT, OrderedGeneration, OrderedRequests, Work, check_lookahead
from .overrides import row_params
from .progress import job_progress
from .records import OUTPUT_COLUMNS, TOOL_COLUMNS, carried, output_record
from .sinks import ResumePoint, Sink, WriteMode, open_sink
from .sizing import SizedContext, open_sized_model
from .sources import Columns, InputRow, Source, open_source

logger = logging.getLogger("parallel_gen")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class JobSummary:
    """What a file job did."""

    output: Optional[str]
    """The output file (None: stdout)."""
    rows: int
    """Rows in the output now: skipped + written."""
    written: int
    """Rows written by this run."""
    skipped: int
    """Rows already in the output (resume) and not generated again."""
    failed: int
    """Rows of this run written with an error."""
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    """Wall time of this run."""
    n_ctx: int
    """Tokens per sequence of the Model that ran it."""
    interrupted: bool = False
    """Stopped by Ctrl-C before the input's end (rows written so far are kept)."""

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time, this run (0 for classify jobs)."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        """Rows written per second of wall time, this run."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the job; every row written so far is kept. ``summary`` says how far
    it got; rerun with ``resume=True`` (``--resume``) to continue."""

    def __init__(self, summary: JobSummary) -> None:
        super().__init__(f"interrupted after {summary.rows} rows")
        self.summary = summary


@dataclass
class _Settings:
    """What turns an input row into engine work."""

    base: SamplingParams
    cells_are_text: bool
    chat: bool
    system: Optional[str]
    template_arg: Optional[str]
    sized: Optional[SizedContext]
    template: Optional[ChatTemplate] = None
    tools: Optional[ToolRequest] = None
    _plan: Optional[ToolPlan] = None

    def chat_template(self, model: Model) -> ChatTemplate:
        """Built on first use: a job of plain prompts needs no template (a base model has none)."""
        if self.template is None:
            self.template = ChatTemplate(model, self.template_arg)
        return self.template

    def plan(self, model: Model) -> ToolPlan:
        """The chat template with the job's tools (built on first use, like the template)."""
        if self._plan is None:
            self._plan = ToolPlan(self.chat_template(model), self.tools)
        return self._plan


def run_file_job(model: Union[Model, PathLike, None], input: Optional[PathLike], output: Optional[PathLike], *,
                 input_format: str = "auto", output_format: str = "auto", prompt_column: str = "prompt",
                 messages_column: str = "messages", resume: bool = False, overwrite: bool = False,
                 chat: bool = False, system: Optional[str] = None, chat_template: Optional[str] = None,
                 progress: Optional[bool] = None, params: Optional[SamplingParams] = None,
                 lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None,
                 tools: Optional[List[Dict[str, Any]]] = None, tool_choice: Any = None,
                 parallel_tool_calls: bool = True, **sampling: Any) -> JobSummary:
    """Generates for every row of ``input`` and writes one output row per input row.

    Args:
        model: a :class:`Model`; or a GGUF path (None: the default model), opened with
            ``model_options`` and, unless they give ``n_ctx``, a context sized to the
            work: the longest prompt among the first look-ahead rows (twice it, for
            rows further on) plus max_tokens, rounded up to 256. A later row that does
            not fit gets an error row naming ``n_ctx``.
        input: the input file; ``"-"`` or None reads stdin.
        output: the output file; ``"-"`` or None writes stdout (not resumable).
        input_format: "auto" (by extension; else JSONL when the first non-blank line
            is a JSON object with the prompt or messages field, else text), "text",
            "jsonl", "csv" or "parquet".
        output_format: "auto" (by extension, else JSONL), "jsonl", "csv", "parquet"
            or "text" (the texts alone).
        prompt_column, messages_column: the fields holding the prompt or the
            conversation (a list of {"role", "content"} messages).
        resume: continue a job whose output exists: its rows are skipped, a torn last
            row is redone.
        overwrite: replace an existing output. Without either, an existing output is
            an error (JobInputError) and is left untouched.
        chat, system, chat_template: send plain prompts through the chat template as a
            user message (with ``system`` as system message); conversations always are.
        progress: a tqdm bar on stderr (rows, tokens/s, ETA); None: when stderr is a
            terminal and tqdm is installed.
        params, **sampling: the job's SamplingParams (fields as keywords override).
            A row's own fields named like SamplingParams fields override them for that
            row. Row r gets seed + r unless the row gives its own seed.
        lookahead: most rows in flight (default: 4 per slot).
        model_options: Model keywords when ``model`` is a path.
        tools, tool_choice, parallel_tool_calls: tools offered in every row's
            conversation, as for :func:`parallel_gen.chat_parallel` (tools imply chat).

    Each output row holds the input row's fields, then ``row`` (the input row number,
    from 0), ``text``, ``finish_reason``, ``stop_reason``, ``prompt_tokens``,
    ``completion_tokens``, ``error``; with tools, ``content`` and ``tool_calls`` (a list
    of OpenAI-style calls, empty when the reply has none or the row failed); ``samples``
    when n > 1. A bad row (malformed JSON, no prompt, a prompt too long) is written with
    ``error`` set.

    Returns:
        A :class:`JobSummary`.

    Raises:
        JobInputError: unreadable input, a protected or unresumable output, bad options.
        JobInterrupted: Ctrl-C (a KeyboardInterrupt); the rows written are kept.
        GenerationError: llama.cpp failed fatally; the rows written are kept.
    """
    source, out_path = open_file_source(input, output, input_format, output_format,
                                        Columns(prompt_column, messages_column), progress=progress,
                                        lookahead=lookahead, resume=resume, overwrite=overwrite)
    try:
        return run_source_job(model, source, out_path, output_format=output_format, resume=resume,
                              overwrite=overwrite, chat=chat, system=system, chat_template=chat_template,
                              progress=progress, params=params, lookahead=lookahead, model_options=model_options,
                              tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                              **sampling)
    finally:
        source.close()


def run_source_job(model: Union[Model, PathLike, None], source: Source, output: Optional[str], *,
                   output_format: str = "auto", resume: bool = False, overwrite: bool = False, chat: bool = False,
                   system: Optional[str] = None, chat_template: Optional[str] = None,
                   progress: Optional[bool] = None, params: Optional[SamplingParams] = None,
                   lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None,
                   tools: Optional[List[Dict[str, Any]]] = None, tool_choice: Any = None,
                   parallel_tool_calls: bool = True, **sampling: Any) -> JobSummary:
    """run_file_job on an opened :class:`~parallel_gen.jobs.sources.Source` (the CLI's
    prompts from arguments are one); ``output`` None is stdout."""
    t0 = time.perf_counter()
    _check_options(progress, lookahead, resume, overwrite)
    try:
        request = tool_request(tools, tool_choice, parallel_tool_calls)
    except (TypeError, ValueError) as e:
        raise JobInputError(str(e)) from None
    base = SamplingParams() if params is None else params
    if not isinstance(base, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(base).__name__}")
    base = base.replace(**sampling) if sampling else base
    if base.seed is None:  # one seed for the job: row r samples with seed + r
        base = base.replace(seed=secrets.randbits(32))
    # A system message, a template or tools only make sense in a chat: each implies chat.
    chatty = chat or system is not None or chat_template is not None or request is not None
    settings = _Settings(base, source.format is InputFormat.CSV, chatty, system, chat_template, None, tools=request)
    return run_rows(model, source, output, _Generation(settings), output_format=output_format, resume=resume,
                    overwrite=overwrite, progress=progress, lookahead=lookahead, model_options=model_options,
                    t0=t0)


def open_file_source(input: Optional[PathLike], output: Optional[PathLike], input_format: str,
                     output_format: str, columns: Columns, *, progress: Optional[bool], lookahead: Optional[int],
                     resume: bool, overwrite: bool) -> Tuple[Source, Optional[str]]:
    """The input of a file job, opened (close it), and the output path (None: stdout),
    after every check that needs no model: bad options fail before any file is touched."""
    in_path = None if input is None else os.fspath(input)
    out_path = None if output is None or os.fspath(output) == STDIN else os.fspath(output)
    if in_path not in (None, STDIN) and out_path is not None and os.path.exists(out_path) \
            and os.path.exists(in_path) and os.path.samefile(in_path, out_path):
        raise JobInputError(f"the output {out_path} is the input file: write to another file")
    input_format_for(in_path, input_format)
    output_format_for(out_path, output_format)
    _check_options(progress, lookahead, resume, overwrite)
    return open_source(in_path, input_format, columns), out_path


@dataclass(frozen=True)
class RowDone:
    """One finished row of a job: its output record and the tokens it took."""

    record: Dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RowJob(abc.ABC):
    """A kind of file job (generation, classification): how its input rows become
    engine work and output rows. :func:`run_rows` does the rest, the same for all:
    the output's protection and resume, the Model sized to the work, ordered writing,
    progress, Ctrl-C."""

    noun = "rows"
    """What the input's rows are, for "no prompts in FILE"."""
    chat_template: Optional[str] = None
    """The chat template that ``describe``'s conversations are rendered with (None: the model's)."""
    tools: Optional[ToolRequest] = None
    """Tools offered in those conversations (they lengthen the prompt)."""

    @abc.abstractmethod
    def carried(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        """The input fields as they appear in this job's output row."""

    @abc.abstractmethod
    def describe(self, row: InputRow) -> Tuple[Optional[List[Any]], Optional[str], int]:
        """(conversation, prompt, tokens after the prompt) of a row, to size the context."""

    def prepare(self, model: Model, sized: Optional[SizedContext]) -> None:
        """Checks and set-up that need the Model, before any row (errors stop the job)."""

    def check_resume(self, last: Dict[str, Any], input_fields: Collection[str]) -> None:
        """Raises JobInputError when ``last``, the last row written, is not a row this job
        writes (its columns, less the carried ``input_fields``)."""

    @abc.abstractmethod
    def ordered(self, model: Model, rows: Iterator[InputRow], lookahead: Optional[int]) -> OrderedRequests[Any, Any]:
        """The engine run of ``rows``: one result per row, in order."""

    @abc.abstractmethod
    def record(self, row: InputRow, result: Any) -> RowDone:
        """A row's output record from its result."""


class _Generation(RowJob):
    """generate: every row's prompt or conversation completed with its SamplingParams."""

    noun = "prompts"

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.chat_template = settings.template_arg
        self._model: Optional[Model] = None

    def carried(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        return carried(fields, self._columns)

    @property
    def _columns(self) -> Tuple[str, ...]:
        return OUTPUT_COLUMNS + (TOOL_COLUMNS if self.settings.tools is not None else ())

    @property
    def tools(self) -> Optional[ToolRequest]:
        return self.settings.tools

    def describe(self, row: InputRow) -> Tuple[Optional[List[Any]], Optional[str], int]:
        s = self.settings
        return _sizing_prompt(row, s.base, s.cells_are_text, s.chat, s.system)

    def prepare(self, model: Model, sized: Optional[SizedContext]) -> None:
        self.settings.sized = sized
        self._model = model
        if self.settings.chat:
            self.settings.plan(model)  # no usable template, tools it cannot offer: an error before any row

    def ordered(self, model: Model, rows: Iterator[InputRow], lookahead: Optional[int]) -> OrderedGeneration:
        return OrderedGeneration(model, (_work(model, row, self.settings) for row in rows), lookahead)

    def record(self, row: InputRow, result: Completion) -> RowDone:
        if self.settings.tools is not None and self._model is not None:
            result = self.settings.plan(self._model).read_completion(self._model, result)
        record = output_record(row.row, row.fields, result, tools=self.settings.tools is not None)
        return RowDone(record, result.prompt_tokens, result.completion_tokens)


def run_rows(model: Union[Model, PathLike, None], source: Source, output: Optional[str], job: RowJob, *,
             output_format: str = "auto", resume: bool = False, overwrite: bool = False,
             progress: Optional[bool] = None, lookahead: Optional[int] = None,
             model_options: Optional[Mapping[str, Any]] = None, t0: Optional[float] = None) -> JobSummary:
    """Runs ``job`` on every row of ``source`` into ``output`` (None: stdout): the part
    every kind of file job shares. Arguments as :func:`run_file_job`'s."""
    t0 = time.perf_counter() if t0 is None else t0
    _check_options(progress, lookahead, resume, overwrite)
    first = next(source.rows, None)  # an empty input is a mistake: say so before touching the output
    if first is None:
        raise JobInputError(f"no {job.noun} in {source.name}")
    source.rows = itertools.chain([first], source.rows)
    sink, point = open_sink(output, output_format_for(output, output_format), _mode(resume, overwrite))
    try:
        return _run(model, source, sink, point, job, progress, lookahead, dict(model_options or {}), t0)
    finally:
        sink.close()


def _check_options(progress: Optional[bool], lookahead: Optional[int], resume: bool, overwrite: bool) -> None:
    make_progress(progress, 0)  # a bad value, or progress=True without tqdm
    check_lookahead(lookahead)
    if resume and overwrite:
        raise JobInputError("resume and overwrite exclude each other: --resume continues the output, "
                            "--overwrite replaces it")


def _mode(resume: bool, overwrite: bool) -> WriteMode:
    return WriteMode.RESUME if resume else WriteMode.OVERWRITE if overwrite else WriteMode.NEW


def _run(model: Union[Model, PathLike, None], source: Source, sink: Sink, point: ResumePoint, job: RowJob,
         progress: Optional[bool], lookahead: Optional[int], model_options: Dict[str, Any], t0: float) -> JobSummary:
    rows = _skip_done(source, sink, point, job)
    owned = not isinstance(model, Model)
    sized: Optional[SizedContext] = None
    if isinstance(model, Model):
        m = model
    else:
        n_par = model_options.get("n_parallel", 8)
        sample_size = lookahead or LOOKAHEAD_PER_SLOT * n_par
        sample, rows = _peek(rows, sample_size)
        m, sized = open_sized_model(model, sample, job.describe, job.chat_template,
                                    complete=len(sample) < sample_size, tools=job.tools, **model_options)
    try:
        job.prepare(m, sized)
        return _drive(m, rows, sink, point, job, source.total, progress, lookahead, t0)
    finally:
        if owned:
            m.close()


def _peek(rows: Iterator[InputRow], n: int) -> Tuple[List[InputRow], Iterator[InputRow]]:
    sample = list(itertools.islice(rows, n))
    return sample, itertools.chain(sample, rows)


def _skip_done(source: Source, sink: Sink, point: ResumePoint, job: RowJob) -> Iterator[InputRow]:
    """The rows after those already written; checks the last written one is the same
    input row, so a resume against another input fails instead of mixing two jobs."""
    rows = source.rows
    if point.rows_done == 0:
        if point.last:  # a CSV header and no row yet: its columns are the ones written next
            first, rows = _peek(rows, 1)
            if first:
                job.check_resume(point.last, sink.normalize(job.carried(first[0].fields)).keys())
        return rows
    last = None
    for last in itertools.islice(rows, point.rows_done):
        pass
    if last is None or last.row != point.rows_done - 1:
        raise JobInputError(f"--resume: the output has {point.rows_done} rows but {source.name} has only "
                            f"{0 if last is None else last.row + 1}: is it the output of another input?")
    written = point.last or {}
    fields = sink.normalize(job.carried(last.fields))
    job.check_resume(written, fields.keys())
    for key, value in fields.items():
        if key in written and written[key] != value:
            raise JobInputError(f"--resume: output row {last.row} has {key}={written[key]!r} but input row "
                                f"{last.row} has {value!r}: is it the output of another input? "
                                "(--overwrite starts again)")
    logger.info("resuming after %d rows already written%s", point.rows_done,
                f" ({point.torn_bytes} bytes of a torn last row removed)" if point.torn_bytes else "")
    return rows


def _sizing_prompt(row: InputRow, base: SamplingParams, cells_are_text: bool, chat: bool,
                   system: Optional[str]) -> Tuple[Optional[List[Any]], Optional[str], int]:
    """(conversation, prompt, max_tokens) of a row for sizing the context."""
    if row.error is not None:
        return None, None, 0
    params, _ = row_params(base, row.fields, row.row, cells_are_text)
    max_tokens = params.max_tokens if params is not None else base.max_tokens
    return _conversation(row, chat, system), row.prompt, max_tokens


def _conversation(row: InputRow, chat: bool, system: Optional[str]) -> Optional[List[Any]]:
    if row.messages is not None:
        return row.messages
    if chat and row.prompt is not None:
        return ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": row.prompt}]
    return None


def _work(model: Model, row: InputRow, s: _Settings) -> Work:
    """The engine work of one input row, or the reason it has none."""
    if row.error is not None:
        return Work("", s.base, row.error)
    params, error = row_params(s.base, row.fields, row.row, s.cells_are_text)
    if params is None:
        return Work("", s.base, f"{row.where}: {error}")
    prompt = row.prompt or ""
    conversation = _conversation(row, s.chat, s.system)
    if conversation is not None:
        try:
            plan = s.plan(model)
            prompt = plan.render(checked_conversation("messages", conversation))
            params = plan.params(plan.template.add_stops(params))
        except (TypeError, ValueError) as e:
            return Work("", params, f"{row.where}: {e}")
    if s.sized is not None:
        error = s.sized.check(model, prompt, params)
        if error is not None:
            return Work(prompt, params, f"{row.where}: {error}")
    return Work(prompt, params)


def _drive(model: Model, rows: Iterator[InputRow], sink: Sink, point: ResumePoint, job: RowJob,
           total: Optional[int], progress: Optional[bool], lookahead: Optional[int], t0: float) -> JobSummary:
    order: Deque[InputRow] = deque()  # rows pulled and not written yet, in order

    def pulled() -> Iterator[InputRow]:
        for row in rows:
            order.append(row)
            yield row

    gen = job.ordered(model, pulled(), lookahead)
    written = failed = prompt_tokens = completion_tokens = 0

    def summary(interrupted: bool) -> JobSummary:
        return JobSummary(sink.path, point.rows_done + written, written, point.rows_done, failed, prompt_tokens,
                          completion_tokens, time.perf_counter() - t0, model.n_ctx, interrupted)

    with job_progress(progress, total, point.rows_done) as bar:
        it = iter(gen)
        try:
            for result in it:
                done = job.record(order.popleft(), result)
                sink.write(done.record)
                written += 1
                failed += done.record["error"] is not None
                prompt_tokens += done.prompt_tokens
                completion_tokens += done.completion_tokens
                if bar is not None:
                    bar(1, gen.stats.generated_tokens)
        except KeyboardInterrupt:
            gen.close()
            raise JobInterrupted(summary(True)) from None
        finally:
            gen.close()
    sink.finish()
    return summary(False)
