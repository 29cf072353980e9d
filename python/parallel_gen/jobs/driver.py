"""The row driver every file job runs on: rows in, one output row per input row out,
nothing lost on the way.

A :class:`RowJob` says what one kind of job does with a row (generation_job.py,
classify_job.py); :func:`run_rows` does the rest, the same for all: rows are read
lazily, run with bounded look-ahead (OrderedRequests) and each written and flushed as
soon as it and every row before it are done. A killed job is continued with
``resume=True``: rows already written are skipped, a torn last row is redone, and what
a row produces depends on its row number only, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, \
    Union

from ..config import model_config
from ..iterate import LOOKAHEAD_PER_SLOT, OrderedRequests, check_lookahead
from ..model import Model
from ..progress import make_progress
from ..study.record import Recorder
from .formats import STDIN, JobInputError, input_format_for, output_format_for
from .progress import job_progress
from .records import carried
from .sinks import ResumePoint, Sink, WriteMode, open_sink
from .sizing import RowNeeds, SizedContext, open_sized_model
from .sources import Columns, InputRow, Source, open_source

if TYPE_CHECKING:
    from ..tools import ToolRequest

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


@dataclass(frozen=True)
class RowDone:
    """One finished row of a job: its output record and the tokens it took."""

    record: Dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RowJob(abc.ABC):
    """A kind of file job (generation, classification): how its input rows become
    engine work and output rows. :func:`run_rows` (a file) and Ray's BatchRunner (a
    Dataset's batches) do the rest, the same for every kind.

    A job's output columns are a function of the job alone (:attr:`columns`, typed by
    :meth:`arrow_schema`): every row has each of them, whatever its outcome.
    """

    noun = "rows"
    """What the input's rows are, for "no prompts in FILE"."""
    chat_template: Optional[str] = None
    """The chat template that ``describe``'s conversations are rendered with (None: the model's)."""
    tools: "Optional[ToolRequest]" = None
    """Tools offered in those conversations (they lengthen the prompt)."""
    columns: Tuple[str, ...] = ()
    """The columns of every output row after the carried input fields, in order."""
    settings_flags = "settings"
    """The options that decide :attr:`columns`, for the message of a resume that does not match."""
    kind = "rows"
    """The job's name in its run record (OUTPUT.run.json)."""

    def arguments(self) -> Dict[str, Any]:
        """The job's settings, for its run record."""
        return {}

    def carried(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        """The input fields as they appear in this job's output row (one named like a
        column of the job is renamed ``input_<name>``)."""
        return carried(fields, self.columns)

    def writes_column(self, name: str) -> bool:
        """Whether this kind of job writes a column ``name`` under some settings (to tell
        an output written with other settings on resume)."""
        return name in self.columns

    @abc.abstractmethod
    def arrow_schema(self) -> Any:
        """The pyarrow schema of :attr:`columns` (imports pyarrow)."""

    def arrow_values(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """``record`` with its values in the types of :meth:`arrow_schema`."""
        return record

    @abc.abstractmethod
    def describe(self, row: InputRow) -> RowNeeds:
        """What a row needs of the context, to size it (NOTHING: leave the row out)."""

    def prepare(self, model: Model, sized: Optional[SizedContext]) -> None:
        """Checks and set-up that need the Model, before any row (errors stop the job)."""

    def check_resume(self, last: Dict[str, Any], input_fields: Collection[str]) -> None:
        """Raises JobInputError when ``last``, the last row written, is not a row this job
        writes: a column of the job missing, or one that other settings write (less the
        carried ``input_fields``)."""
        missing = [c for c in self.columns if c not in last]
        other = [k for k in last if k not in self.columns and k not in input_fields and self.writes_column(k)]
        if missing or other:
            found = f"the columns {other}" if other else f"no column {missing[0]!r}"
            raise JobInputError(f"--resume: the output has {found} but this job writes {list(self.columns)}: "
                                f"was it written with other {self.settings_flags}? (--overwrite starts again)")

    @abc.abstractmethod
    def ordered(self, model: Model, rows: Iterator[InputRow], lookahead: Optional[int]) -> OrderedRequests[Any, Any]:
        """The engine run of ``rows``: one result per row, in order."""

    @abc.abstractmethod
    def record(self, row: InputRow, result: Any) -> RowDone:
        """A row's output record (every column of the job) from its result."""


def open_job_model(job: RowJob, path: Union[PathLike, None], sample: Sequence[InputRow], *, complete: bool,
                   model_options: Mapping[str, Any]) -> Model:
    """The Model that runs ``job``, prepared for it: opened from ``path`` (None: the
    default model) with ``model_options``; without their ``n_ctx``, a context sized to
    the ``sample`` rows (``complete``: they are all the work). Close it."""
    model, sized = open_sized_model(path, sample, job.describe, job.chat_template, complete=complete,
                                    tools=job.tools, **dict(model_options))
    try:
        job.prepare(model, sized)
    except BaseException:
        model.close()
        raise
    return model


def run_rows(model: Union[Model, PathLike, None], source: Source, output: Optional[str], job: RowJob, *,
             output_format: str = "auto", resume: bool = False, overwrite: bool = False,
             progress: Optional[bool] = None, lookahead: Optional[int] = None,
             model_options: Optional[Mapping[str, Any]] = None, t0: Optional[float] = None,
             sized: Optional[SizedContext] = None) -> JobSummary:
    """Runs ``job`` on every row of ``source`` into ``output`` (None: stdout): the part
    every kind of file job shares. Arguments as :func:`~parallel_gen.jobs.run_file_job`'s;
    ``sized``: how an open ``model`` was sized to these rows, with the prompts that
    sizing tokenized (the job takes them rather than tokenizing again)."""
    t0 = time.perf_counter() if t0 is None else t0
    check_options(progress, lookahead, resume, overwrite)
    first = next(source.rows, None)  # an empty input is a mistake: say so before touching the output
    if first is None:
        raise JobInputError(f"no {job.noun} in {source.name}")
    source.rows = itertools.chain([first], source.rows)
    sink, point = open_sink(output, output_format_for(output, output_format), _mode(resume, overwrite), job)
    try:
        # The run record (OUTPUT.run.json) of a file output; it refuses a resume on a changed input.
        record = Recorder.start(job.kind, sink.path, source.name, job.arguments(), resume, point.rows_done)
    except BaseException:
        sink.close()
        raise
    try:
        summary = _run(model, source, sink, point, job, progress, lookahead, dict(model_options or {}), t0, record,
                       sized)
    except JobInterrupted as e:
        sink.close()
        if record is not None:
            record.end(e.summary.rows, e.summary.written, e.summary.failed, interrupted=True)
        raise
    except BaseException as e:
        sink.close()
        if record is not None:
            record.end(point.rows_done, 0, 0, error=f"{type(e).__name__}: {e}")
        raise
    sink.close()
    if record is not None:
        record.end(summary.rows, summary.written, summary.failed)
    return summary


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
    check_options(progress, lookahead, resume, overwrite)
    return open_source(in_path, input_format, columns), out_path


def check_options(progress: Optional[bool], lookahead: Optional[int], resume: bool, overwrite: bool) -> None:
    """Raises on a bad progress or look-ahead value, or resume with overwrite."""
    make_progress(progress, 0)  # a bad value, or progress=True without tqdm
    check_lookahead(lookahead)
    if resume and overwrite:
        raise JobInputError("resume and overwrite exclude each other: --resume continues the output, "
                            "--overwrite replaces it")


def _mode(resume: bool, overwrite: bool) -> WriteMode:
    return WriteMode.RESUME if resume else WriteMode.OVERWRITE if overwrite else WriteMode.NEW


def _run(model: Union[Model, PathLike, None], source: Source, sink: Sink, point: ResumePoint, job: RowJob,
         progress: Optional[bool], lookahead: Optional[int], model_options: Dict[str, Any], t0: float,
         record: Optional[Recorder] = None, sized: Optional[SizedContext] = None) -> JobSummary:
    rows = _skip_done(source, sink, point, job)
    if isinstance(model, Model):
        job.prepare(model, sized)
        if record is not None:
            record.model(model)
        return _drive(model, rows, sink, point, job, source.total, progress, lookahead, t0)
    sample_size = lookahead or LOOKAHEAD_PER_SLOT * model_config(None, model_options).n_parallel
    sample, rows = _peek(rows, sample_size)
    m = open_job_model(job, model, sample, complete=len(sample) < sample_size, model_options=model_options)
    try:
        if record is not None:
            record.model(m)
        return _drive(m, rows, sink, point, job, source.total, progress, lookahead, t0)
    finally:
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
