"""The generate job: every input row's prompt or conversation completed with its
SamplingParams, one output row per input row (see records.py for its columns).

:class:`GenerationJob` is what one row becomes (the engine work, the output record); it
runs on a file through :func:`~.driver.run_rows` (:func:`run_file_job`, what
``parallel-gen generate`` and R's ``pg_generate_file`` run) and on a Ray Dataset through
``parallel_gen.ray``'s BatchRunner, the same per-row code in both.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ..chat import chat_mode, checked_conversation, conversation
from ..errors import ErrorCode, Failure
from ..core.inputs import prepare
from ..iterate import OrderedGeneration, Work
from ..model import Model
from ..params import SamplingParams, SeedRule
from ..result_cache import ResultCache, open_cache
from ..results import Completion
from ..templates import ChatTemplate
from ..tools import ToolPlan, ToolRequest, tool_request
from .driver import JobSummary, PathLike, RowDone, RowJob, open_file_source, run_rows
from .formats import InputFormat
from .overrides import row_params
from .records import LOGPROBS, OPTIONAL_COLUMNS, OUTPUT_COLUMNS, SAMPLES, arrow_types, arrow_values, \
    output_columns, output_record
from .sizing import NOTHING, RowNeeds, SizedContext
from .sources import Columns, InputRow, Source

# A per-row setting that would need a column the job does not write: (field, needs it,
# the column, how the job asks for it). The columns are the job's, never a row's.
_COLUMN_NEEDS = (
    ("n", lambda p: p.n > 1, SAMPLES, "n > 1 (--samples N; n= from Python)"),
    ("logprobs", lambda p: p.logprobs is not None, LOGPROBS[0], "logprobs (--logprobs K; logprobs= from Python)"),
)


class GenerationJob(RowJob):
    """generate: every row's prompt or conversation completed with its SamplingParams.

    Args:
        params: the job's SamplingParams. Without a seed the job draws one: row r samples
            with seed + r unless the row gives its own seed, so a resumed job (or a
            retried Ray batch) samples a row as the first run did.
        chat, system, chat_template: plain prompts through the chat template as a user
            message (``system`` or ``chat_template`` imply ``chat``); conversations
            always are.
        cells_are_text: the rows' per-row settings are text to convert (CSV cells).
        tools: tools offered in every row's conversation (see
            :func:`~parallel_gen.tools.tool_request`); they imply ``chat``, and the job
            writes the ``content`` and ``tool_calls`` columns.
        cache: rows whose result is a function of their inputs (greedy, or a seed the
            user gave) are looked up there first and stored once decoded whole.
        seed_given: whether ``params.seed`` is the user's (default: whether it is set).

    A row's fields named like SamplingParams fields override ``params`` for that row;
    one that would need a column the job does not write (n > 1 when the job's n is 1,
    logprobs when the job has none) is that row's error, naming the job's flag.
    """

    noun = "prompts"
    settings_flags = "--samples / --logprobs / --tools"
    kind = "generate"

    def __init__(self, params: SamplingParams, *, chat: bool = False, system: Optional[str] = None,
                 chat_template: Optional[str] = None, cells_are_text: bool = False,
                 tools: Optional[ToolRequest] = None, cache: Optional[ResultCache] = None,
                 seed_given: Optional[bool] = None) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        # A seed drawn by the job makes no result reproducible by another run: not worth
        # caching. (A Ray job's actors get the seed its driver drew: seed_given=False.)
        self.seed_given = params.seed is not None if seed_given is None else seed_given
        """Whether the job's seed is the user's, not one the job drew."""
        self.params = params.replace(seed=SeedRule(params.seed).start)
        self.cache = cache
        self.chat = chat_mode(chat, system, chat_template) or tools is not None
        self.system = system
        self.chat_template = chat_template
        self.cells_are_text = cells_are_text
        self.tools = tools
        self.columns = output_columns(self.params, tools is not None)
        self._sized: Optional[SizedContext] = None
        self._plan: Optional[ToolPlan] = None

    def writes_column(self, name: str) -> bool:
        return name in OUTPUT_COLUMNS or name in OPTIONAL_COLUMNS

    def arguments(self) -> Dict[str, Any]:
        return {"params": self.params, "chat": self.chat, "system": self.system, "chat_template": self.chat_template,
                "tools": self.tools}

    def arrow_schema(self) -> Any:
        return arrow_types(self.columns)

    def arrow_values(self, record: Dict[str, Any]) -> Dict[str, Any]:
        return arrow_values(record)

    def describe(self, row: InputRow) -> RowNeeds:
        if row.error is not None:
            return NOTHING
        params, _ = self.row_params(row)
        max_tokens = params.max_tokens if params is not None else self.params.max_tokens
        return RowNeeds(self._conversation(row), row.prompt, max_tokens)

    def prepare(self, model: Model, sized: Optional[SizedContext]) -> None:
        self._sized = sized
        self._plan = None
        if self.chat:
            self._chat_plan(model)  # no usable template: an error before any row

    def row_params(self, row: InputRow) -> Tuple[Optional[SamplingParams], Optional[str]]:
        """The row's SamplingParams (the job's, its own fields applied, its seed), or why
        it has none."""
        params, error = row_params(self.params, row.fields, row.row, self.cells_are_text)
        if params is None:
            return None, error
        for field, needs, column, flag in _COLUMN_NEEDS:
            if needs(params) and column not in self.columns:
                return None, (f"column {field!r}: {field}={getattr(params, field)!r} needs the {column!r} "
                              f"column, which this job writes only with {flag} for the whole job")
        return params, None

    def work(self, model: Model, row: InputRow) -> Work:
        """The engine work of one input row, or the reason it has none."""
        if row.error is not None:
            return Work("", self.params, Failure(ErrorCode.INVALID_INPUT, row.error))
        params, error = self.row_params(row)
        if params is None:
            return Work("", self.params, Failure(ErrorCode.INVALID_PARAM, f"{row.where}: {error}"))
        prompt = row.prompt or ""
        messages = self._conversation(row)
        if messages is not None:
            try:
                plan = self._chat_plan(model)
                prompt = plan.render(checked_conversation("messages", messages))
                params = plan.params(plan.template.add_stops(params))
            except (TypeError, ValueError) as e:
                return Work("", params, Failure(ErrorCode.INVALID_INPUT, f"{row.where}: {e}"))
        # Tokenized once: sizing the context may have done it (the first rows), else here,
        # and the engine takes these tokens.
        prepared = self._sized.take(row.row, prompt) if self._sized is not None else None
        if prepared is None:
            prepared = prepare(model, prompt)
        if self._sized is not None:
            error = self._sized.check(prepared, params)
            if error is not None:
                return Work(prompt, params, Failure(ErrorCode.PROMPT_TOO_LONG, f"{row.where}: {error}"))
        # (an empty seed cell keeps the job's seed: row_params' rule)
        fixed = params.temperature == 0 or self.seed_given or row.fields.get("seed") not in (None, "")
        return Work(prompt, params, prepared=prepared, cacheable=self.cache is not None and fixed)

    def ordered(self, model: Model, rows: Iterator[InputRow], lookahead: Optional[int]) -> OrderedGeneration:
        # A chat job's plan was built by prepare(): the collector reads each output's tool calls.
        return OrderedGeneration(model, (self.work(model, row) for row in rows), lookahead, tools=self._plan,
                                 cache=self.cache)

    def record(self, row: InputRow, result: Completion) -> RowDone:
        return RowDone(output_record(row.row, row.fields, result, self.columns), result.prompt_tokens,
                       result.completion_tokens)

    def _conversation(self, row: InputRow) -> Optional[List[Any]]:
        if row.messages is not None:
            return row.messages
        if self.chat and row.prompt is not None:
            return conversation(row.prompt, self.system)
        return None

    def _chat_plan(self, model: Model) -> ToolPlan:
        """The chat template with the job's tools, built on first use: a job of plain
        prompts needs no template (a base model has none)."""
        if self._plan is None:
            self._plan = ToolPlan(ChatTemplate(model, self.chat_template), self.tools)
        return self._plan


def run_file_job(model: Union[Model, PathLike, None], input: Optional[PathLike], output: Optional[PathLike], *,
                 input_format: str = "auto", output_format: str = "auto", prompt_column: str = "prompt",
                 messages_column: str = "messages", resume: bool = False, overwrite: bool = False,
                 chat: bool = False, system: Optional[str] = None, chat_template: Optional[str] = None,
                 progress: Optional[bool] = None, params: Optional[SamplingParams] = None,
                 lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None,
                 tools: Optional[Sequence[Mapping[str, Any]]] = None, tool_choice: Any = None,
                 parallel_tool_calls: bool = True, cache: Union[None, PathLike, ResultCache] = None,
                 **sampling: Any) -> JobSummary:
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
        model_options: Model keywords (ModelConfig fields) when ``model`` is a path.
        tools, tool_choice, parallel_tool_calls: tools offered in every row's
            conversation, as for :func:`parallel_gen.chat_parallel` (tools imply chat).
        cache: a result cache (a directory, a ``redis://`` URL or a
            :class:`~parallel_gen.ResultCache`), as for :func:`parallel_gen.generate_parallel`:
            rows whose result is a function of their inputs (greedy, or a seed given by the
            job or the row) are looked up first, and stored once finished (whole prefills only).

    Each output row holds the input row's fields, then ``row`` (the input row number,
    from 0), ``text``, ``finish_reason``, ``stop_reason``, ``prompt_tokens``,
    ``completion_tokens``, ``error``; with tools, ``content`` and ``tool_calls`` (a list
    of OpenAI-style calls, empty when the reply has none or the row failed); ``samples``
    when n > 1; ``logprobs`` ([token, logprob] per generated token) and ``cumulative_logprob`` when logprobs is set. These
    columns follow the job's settings, the same in every row (a failed row has null
    logprobs), and a row whose own ``n`` or ``logprobs`` would need a column the job does
    not write is an error row. A bad row (malformed JSON, no prompt, a prompt too long) is
    written with ``error`` set.

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
                              cache=cache, **sampling)
    finally:
        source.close()


def run_source_job(model: Union[Model, PathLike, None], source: Source, output: Optional[str], *,
                   output_format: str = "auto", resume: bool = False, overwrite: bool = False, chat: bool = False,
                   system: Optional[str] = None, chat_template: Optional[str] = None,
                   progress: Optional[bool] = None, params: Optional[SamplingParams] = None,
                   lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None,
                   tools: Optional[Sequence[Mapping[str, Any]]] = None, tool_choice: Any = None,
                   parallel_tool_calls: bool = True, cache: Union[None, PathLike, ResultCache] = None,
                   **sampling: Any) -> JobSummary:
    """run_file_job on an opened :class:`~parallel_gen.jobs.sources.Source` (the CLI's
    prompts from arguments are one); ``output`` None is stdout."""
    t0 = time.perf_counter()
    params = job_params(params, sampling)
    request = tool_request(tools, tool_choice, parallel_tool_calls)
    result_cache = open_cache(cache)
    try:
        job = GenerationJob(params, chat=chat, system=system, chat_template=chat_template,
                            cells_are_text=source.format is InputFormat.CSV, tools=request, cache=result_cache)
        return run_rows(model, source, output, job, output_format=output_format, resume=resume,
                        overwrite=overwrite, progress=progress, lookahead=lookahead, model_options=model_options,
                        t0=t0)
    finally:
        if result_cache is not None and result_cache is not cache:
            result_cache.close()  # opened from a path or URL for this job


def job_params(params: Optional[SamplingParams], sampling: Mapping[str, Any]) -> SamplingParams:
    """A job's SamplingParams: ``params`` (default: SamplingParams()) with the ``sampling``
    keywords applied."""
    base = SamplingParams() if params is None else params
    if not isinstance(base, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(base).__name__}")
    return base.replace(**sampling) if sampling else base


__all__ = ["GenerationJob", "job_params", "run_file_job", "run_source_job"]
