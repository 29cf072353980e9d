"""BatchRunner(job): the map_batches callable class that runs a file job's rows, one
Model per Ray actor; BatchGenerator (generate) and BatchClassifier (classify) are it
with their job.

A batch (a pyarrow Table) keeps its columns as they are and gains the job's output
columns (RowJob.columns, with the job's Arrow types: every block has one schema,
whatever its rows' outcomes). The rows are those the job writes to a file, by the same
per-row code (jobs.generation_job, jobs.classify_job). A row that cannot run gets
``error`` set; the batch, and so the dataset, never fails for one row.
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pyarrow as pa
import ray

from ..jobs.driver import RowJob, open_job_model
from ..jobs.generation_job import GenerationJob
from ..jobs.sources import Columns, InputRow, row_from_fields
from ..model import Model
from ..params import SamplingParams
from ..result_cache import open_cache
from ..tools import ToolRequest

logger = logging.getLogger("parallel_gen")

INPUT_ERROR_COLUMN = "__parallel_gen_input_error"
"""A column whose value, when set, is why its row could not be read (a malformed JSONL
line): it becomes the row's error and is not carried."""


class BatchRunner:
    """Callable class for ``ray.data.Dataset.map_batches(..., batch_format="pyarrow")``
    that runs ``job`` (a :class:`~parallel_gen.jobs.RowJob`) on every row of a batch.

    Each actor opens one Model: ``n_threads`` from the CPUs Ray assigned the actor,
    ``n_gpu_layers=-1`` when it was assigned a GPU, then ``model_options``. Without
    ``n_ctx`` in them, the context is sized from the actor's first batch (with room for
    prompts twice as long; a later row that does not fit gets an error naming n_ctx).

    A Dataset has no row numbers: a row's number (what a job counts seeds from) is a
    hash of its fields, so a row samples the same whichever batch, actor or retry runs
    it; the output's ``row`` column is null.
    """

    def __init__(self, job: RowJob, model: Optional[str], columns: Columns,
                 model_options: Optional[Mapping[str, Any]] = None) -> None:
        self.job = job
        self._path = model
        self._columns = columns
        self._options = {**actor_model_options(), **dict(model_options or {})}
        self._model: Optional[Model] = None
        if self._options.get("n_ctx") is not None:  # else sized from the first batch
            self._open([])

    def _open(self, sample: List[InputRow]) -> Model:
        # a job that cannot run on this model (chat without a template) fails the actor, not every row
        self._model = open_job_model(self.job, self._path, sample, complete=False, model_options=self._options)
        return self._model

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with the job's output columns added, rows in the same order."""
        batch, rows = input_rows(batch, self._columns)
        records: List[Dict[str, Any]] = []
        if rows:
            model = self._model or self._open(rows)
            results = self.job.ordered(model, iter(rows), len(rows))
            records = [self.job.arrow_values(self.job.record(row, result).record) for row, result in zip(rows, results)]
        out = batch.rename_columns(list(self.job.carried({name: None for name in batch.column_names})))
        for field in self.job.arrow_schema():
            # row numbers here are hashes, meaningless to the Dataset: null
            values = [None] * len(records) if field.name == "row" else [rec[field.name] for rec in records]
            out = out.append_column(field, pa.array(values, type=field.type))
        return out

    def __del__(self) -> None:
        if getattr(self, "_model", None) is not None:
            self._model.close()


class BatchGenerator(BatchRunner):
    """BatchRunner of the generate job (the rows of ``parallel-gen generate``).

    Args:
        model: GGUF path, readable on every node (None: the default model, found on
            each node, which installs it with ``parallel-gen install-model``).
        params: the job's SamplingParams (its seed must be set: see :func:`generate`).
            A row's columns named like SamplingParams fields override them for that row.
        prompt_column, messages_column: the columns holding the prompt or the
            conversation (a list of {"role", "content"}).
        chat, system, chat_template: as for :func:`parallel_gen.run_file_job`.
        model_options: other Model keywords (ModelConfig fields: n_parallel, n_ctx, ...).
        cache: a result cache every actor opens (a redis:// URL, shared by the nodes, or
            a directory each node can write): rows whose result is a function of their
            inputs are looked up there first and stored once decoded whole.
        seed_given: whether ``params.seed`` is the user's; False: the driver drew it, so
            sampled rows are not cached.
        tools: tools offered in every row's conversation (a checked
            :class:`~parallel_gen.tools.ToolRequest`); they add ``content`` and ``tool_calls``.

    Output columns: the input's (one named like an output column is carried as
    ``input_<name>``), then ``row`` (null: a Dataset has no row numbers; identify rows
    by a column of their own, an id), ``text``, ``finish_reason``,
    ``stop_reason`` (text: a stop string, or a stop token id written as text),
    ``prompt_tokens``, ``completion_tokens``, ``error``; ``samples`` when n > 1;
    ``logprobs`` (a list of {token, logprob}) and ``cumulative_logprob`` when logprobs
    is set. These follow the job's settings: every block has the same columns and types
    (a failed row has null logprobs).
    """

    def __init__(self, model: Optional[str] = None, *, params: SamplingParams,
                 prompt_column: str = "prompt", messages_column: str = "messages", chat: bool = False,
                 system: Optional[str] = None, chat_template: Optional[str] = None,
                 model_options: Optional[Mapping[str, Any]] = None, cache: Optional[str] = None,
                 seed_given: bool = True, tools: Optional[ToolRequest] = None) -> None:
        if not isinstance(params, SamplingParams) or params.seed is None:
            raise ValueError("params must be a SamplingParams with its seed set")
        job = GenerationJob(params, chat=chat, system=system, chat_template=chat_template,
                            cache=open_cache(cache), seed_given=seed_given, tools=tools)
        super().__init__(job, model, Columns(prompt_column, messages_column), model_options)


def input_rows(batch: pa.Table, columns: Columns) -> Tuple[pa.Table, List[InputRow]]:
    """The batch without the column of read errors (see INPUT_ERROR_COLUMN), and its rows
    parsed as a file job parses them, numbered by a hash of their fields."""
    errors: List[Optional[str]] = [None] * batch.num_rows
    if INPUT_ERROR_COLUMN in batch.column_names:
        errors = batch.column(INPUT_ERROR_COLUMN).to_pylist()
        batch = batch.drop_columns([INPUT_ERROR_COLUMN])
    rows = [row_from_fields(_fields_hash(fields), "input row", fields, columns, error)
            for fields, error in zip(batch.to_pylist(), errors)]
    return batch, rows


def actor_model_options() -> Dict[str, Any]:
    """n_threads from the CPUs Ray assigned this actor; every layer on the GPU when it
    was assigned one (outside a Ray actor, a driver included: nothing)."""
    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # get_assigned_resources asserts in a driver
        return {}
    resources = context.get_assigned_resources()
    return actor_options(resources.get("CPU", 1), resources.get("GPU", 0))


def actor_options(cpus: float, gpus: float) -> Dict[str, Any]:
    """The Model options of an actor given ``cpus`` and ``gpus``: its CPUs as llama.cpp
    threads, every layer on its GPU when it has one (the job's model_options come after)."""
    options: Dict[str, Any] = {"n_threads": max(1, int(cpus))}
    if gpus > 0:
        options["n_gpu_layers"] = -1
    return options


def actor_resources(model_options: Mapping[str, Any]) -> Tuple[int, int]:
    """(CPUs, GPUs) Ray reserves for an actor holding one Model with these options: its
    threads (``n_threads``, default 1), and one GPU when ``n_gpu_layers`` offloads layers.
    Inside the actor, :func:`actor_model_options` turns them back into Model options."""
    threads = model_options.get("n_threads")
    return (1 if threads is None else int(threads)), (1 if model_options.get("n_gpu_layers") else 0)


def _fields_hash(fields: Dict[str, Any]) -> int:
    text = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return zlib.crc32(text.encode("utf-8"))
