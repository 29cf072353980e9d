"""BatchGenerator: the map_batches callable class, one Model per Ray actor.

A batch (a pyarrow Table) keeps its columns as they are and gains the output columns
of a file job (jobs.records): one definition of an output row. A row that cannot run
gets ``error`` set; the batch, and so the dataset, never fails for one row.
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import pyarrow as pa
import ray

from ..jobs.job import _Settings, _sizing_prompt, _work
from ..iterate import OrderedGeneration
from ..jobs.records import OUTPUT_COLUMNS, carried, output_record
from ..jobs.sizing import open_sized_model
from ..jobs.sources import Columns, InputRow, _from_fields
from ..model import Model
from ..params import SamplingParams

logger = logging.getLogger("parallel_gen")

OUTPUT_SCHEMA = pa.schema([("row", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string()),
                           ("stop_reason", pa.string()), ("prompt_tokens", pa.int64()),
                           ("completion_tokens", pa.int64()), ("error", pa.string())])
"""Types of the output columns, fixed so that every block (and every file written) has
the same schema, even a block whose rows all have a null ``error``."""
if tuple(OUTPUT_SCHEMA.names) != OUTPUT_COLUMNS:  # checked at import, -O or not
    raise RuntimeError("jobs.records.OUTPUT_COLUMNS changed: update OUTPUT_SCHEMA")

INPUT_ERROR_COLUMN = "__parallel_gen_input_error"
"""A column whose value, when set, is why its row could not be read (a malformed JSONL
line): it becomes the row's error and is not carried."""


class BatchGenerator:
    """Callable class for ``ray.data.Dataset.map_batches(..., batch_format="pyarrow")``.

    Each actor opens one Model: ``n_threads`` from the CPUs Ray assigned the actor,
    ``n_gpu_layers=-1`` when it was assigned a GPU. Without ``n_ctx`` in
    ``model_options``, the context is sized from the actor's first batch (with room
    for prompts twice as long; a later row that does not fit gets an error naming n_ctx).

    Args:
        model: GGUF path, readable on every node (None: the default model, found on
            each node, which installs it with ``parallel-gen install-model``).
        params: the job's SamplingParams (its seed must be set: see :func:`generate`).
            A row's columns named like SamplingParams fields override them for that row.
        prompt_column, messages_column: the columns holding the prompt or the
            conversation (a list of {"role", "content"}).
        chat, system, chat_template: as for :func:`parallel_gen.run_file_job`.
        model_options: other Model keywords (n_parallel, n_ctx, ...).

    Output columns: the input's (one named like an output column is carried as
    ``input_<name>``), then ``row`` (null: a Dataset has no row numbers; identify rows
    by a column of their own, an id), ``text``, ``finish_reason``,
    ``stop_reason`` (text: a stop string, or a stop token id written as text),
    ``prompt_tokens``, ``completion_tokens``, ``error``; ``samples`` when n > 1.
    """

    def __init__(self, model: Optional[str] = None, *, params: SamplingParams,
                 prompt_column: str = "prompt", messages_column: str = "messages", chat: bool = False,
                 system: Optional[str] = None, chat_template: Optional[str] = None,
                 model_options: Optional[Mapping[str, Any]] = None) -> None:
        if not isinstance(params, SamplingParams) or params.seed is None:
            raise ValueError("params must be a SamplingParams with its seed set")
        self._path = model
        self._columns = Columns(prompt_column, messages_column)
        self._options = {**actor_model_options(), **dict(model_options or {})}
        chatty = chat or system is not None or chat_template is not None
        self._settings = _Settings(params, False, chatty, system, chat_template, None)
        self._model: Optional[Model] = None
        if self._options.get("n_ctx") is not None:  # else sized from the first batch
            self._open([])

    def _open(self, sample: List[InputRow]) -> Model:
        s = self._settings
        self._model, s.sized = open_sized_model(
            self._path, sample, lambda r: _sizing_prompt(r, s.base, False, s.chat, s.system), s.template_arg,
            complete=False, **self._options)
        if s.chat:
            s.chat_template(self._model)  # no usable template: fail the actor, not every row
        return self._model

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with the output columns added, rows in the same order."""
        # A Dataset has no row numbers: a row's seed is the job's seed + a hash of its
        # fields (InputRow.row is what jobs count seeds from), so a row samples the same
        # whichever batch or actor runs it, a retried batch included.
        batch, rows = input_rows(batch, self._columns, lambda i, fields: _fields_hash(fields))
        if not rows:
            return _with_outputs(batch, [])
        model = self._model or self._open(rows)
        works = iter([_work(model, r, self._settings) for r in rows])
        records = [output_record(r.row, r.fields, c)
                   for r, c in zip(rows, OrderedGeneration(model, works, len(rows)))]
        for rec in records:
            rec["row"] = None
        return _with_outputs(batch, records)

    def __del__(self) -> None:
        if getattr(self, "_model", None) is not None:
            self._model.close()


def input_rows(batch: pa.Table, columns: Columns,
               row_number: Callable[[int, Dict[str, Any]], int]) -> Tuple[pa.Table, List[InputRow]]:
    """The batch without the column of read errors (see INPUT_ERROR_COLUMN), and its rows
    parsed as a file job parses them; ``row_number(i, fields)`` numbers row i."""
    errors: List[Optional[str]] = [None] * batch.num_rows
    if INPUT_ERROR_COLUMN in batch.column_names:
        errors = batch.column(INPUT_ERROR_COLUMN).to_pylist()
        batch = batch.drop_columns([INPUT_ERROR_COLUMN])
    rows = [_from_fields(row_number(i, fields), "input row", fields, columns, error)
            for i, (fields, error) in enumerate(zip(batch.to_pylist(), errors))]
    return batch, rows


def actor_model_options() -> Dict[str, Any]:
    """n_threads from the CPUs Ray assigned this actor; every layer on the GPU when it
    was assigned one (outside a Ray worker: nothing)."""
    if not ray.is_initialized():
        return {}
    resources = ray.get_runtime_context().get_assigned_resources()
    options: Dict[str, Any] = {"n_threads": max(1, int(resources.get("CPU", 1)))}
    if resources.get("GPU", 0) > 0:
        options["n_gpu_layers"] = -1
    return options


def _fields_hash(fields: Dict[str, Any]) -> int:
    text = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return zlib.crc32(text.encode("utf-8"))


def _with_outputs(batch: pa.Table, records: List[Dict[str, Any]]) -> pa.Table:
    """The input columns as they are (renamed as jobs.records.carried renames them),
    then the output columns of ``records``."""
    renamed = list(carried({name: None for name in batch.column_names}))
    out = batch.rename_columns(renamed)
    for rec in records:  # a stop string or a stop token id: one column type, text
        for holder in [rec, *(rec.get("samples") or [])]:
            if isinstance(holder.get("stop_reason"), int):
                holder["stop_reason"] = str(holder["stop_reason"])
    for field in OUTPUT_SCHEMA:
        out = out.append_column(field, pa.array([rec[field.name] for rec in records], type=field.type))
    for name in [k for k in (records[0] if records else {}) if k not in OUTPUT_SCHEMA.names and k not in renamed]:
        out = out.append_column(name, pa.array([rec.get(name) for rec in records]))
    return out
