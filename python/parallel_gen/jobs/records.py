"""The output row of a generate job: the input's fields plus what generation produced.

Its columns are a function of the job (its SamplingParams), never of a row's outcome:
``samples`` when the job's n > 1, ``logprobs`` and ``cumulative_logprob`` when it asks
for logprobs; a row that failed has null logprobs (and samples that each give the
error). So every row of a file, and every Arrow block of a Ray job, has the same
columns and types.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, Optional, Tuple

from ..params import SamplingParams
from ..results import Completion, Output

OUTPUT_COLUMNS = ("row", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error",
                  "error_code")
"""Columns every output row has, after the input's own fields."""
SAMPLES = "samples"
"""Every output of the row (text, finish_reason, stop_reason, completion_tokens, error, error_code): when the job's n > 1."""
LOGPROBS = ("logprobs", "cumulative_logprob")
"""The first output's [token text, logprob] per generated token, and their sum: when the job asks for logprobs."""
TOOL_COLUMNS = ("content", "tool_calls")
"""The first output's text besides its calls, and its calls (OpenAI's shape): when the job offers tools."""
OPTIONAL_COLUMNS = (SAMPLES, *LOGPROBS, *TOOL_COLUMNS)
RENAMED_PREFIX = "input_"
"""An input field named like an output column is carried as ``input_<name>``."""


def carried(fields: Dict[str, Any], output_columns: Collection[str] = OUTPUT_COLUMNS) -> Dict[str, Any]:
    """The input fields as they appear in an output row whose own columns are ``output_columns``."""
    return {(RENAMED_PREFIX + k if k in output_columns else k): v for k, v in fields.items()}


def output_columns(params: SamplingParams, tools: bool = False) -> Tuple[str, ...]:
    """The columns of a generate job with SamplingParams ``params`` (and ``tools`` offered
    or not), after the input's fields."""
    return (OUTPUT_COLUMNS + (TOOL_COLUMNS if tools else ()) + ((SAMPLES,) if params.n > 1 else ())
            + (LOGPROBS if params.logprobs is not None else ()))


def output_record(row: int, fields: Dict[str, Any], completion: Completion,
                  columns: Collection[str]) -> Dict[str, Any]:
    """One output row with the job's ``columns`` (see :func:`output_columns`): the input
    fields, then ``row``, the first output's text and finish, token counts and error;
    ``error_code`` (the failure's :class:`~parallel_gen.ErrorCode` value, null when none);
    the first output's content and tool calls ([] when the row failed or made none);
    every output in ``samples``, the first one's logprobs (null where it has none)."""
    rec = carried(fields, columns)
    failed = next((o for o in completion.outputs if o.finish_reason == "error"), None)
    rec.update(row=row, text=completion.text, finish_reason=completion.finish_reason,
               stop_reason=completion.stop_reason, prompt_tokens=completion.prompt_tokens,
               completion_tokens=completion.completion_tokens, **_error_fields(failed))
    tools = TOOL_COLUMNS[0] in columns
    if tools:
        rec.update(_tool_fields(completion.outputs[0]))
    if SAMPLES in columns:
        rec[SAMPLES] = [{"text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                         "completion_tokens": len(o.token_ids), **_error_fields(o),
                         **(_tool_fields(o) if tools else {})} for o in completion.outputs]
    if LOGPROBS[0] in columns:
        first = completion.outputs[0]
        has = first.logprobs is not None
        rec[LOGPROBS[0]] = [[t.token, t.logprob] for t in first.logprobs] if has else None  # type: ignore[union-attr]
        rec[LOGPROBS[1]] = first.cumulative_logprob if has else None
    return rec


def arrow_types(columns: Collection[str]) -> Any:
    """The pyarrow schema of a generate job's ``columns``: fixed, so every block and file
    of the job has the same one, whatever its rows' outcomes (see :func:`arrow_values`)."""
    import pyarrow as pa

    text, count = pa.string(), pa.int64()
    calls = pa.list_(pa.struct([("id", text), ("type", text),
                                ("function", pa.struct([("name", text), ("arguments", text)]))]))
    tool_types = [("content", text), ("tool_calls", calls)] if TOOL_COLUMNS[0] in columns else []
    types = {"row": count, "text": text, "finish_reason": text, "stop_reason": text, "prompt_tokens": count,
             "completion_tokens": count, "error": text, "error_code": text,
             TOOL_COLUMNS[0]: text, TOOL_COLUMNS[1]: calls,
             SAMPLES: pa.list_(pa.struct([("text", text), ("finish_reason", text), ("stop_reason", text),
                                          ("completion_tokens", count), ("error", text), ("error_code", text),
                                          *tool_types])),
             LOGPROBS[0]: pa.list_(pa.struct([("token", text), ("logprob", pa.float64())])),
             LOGPROBS[1]: pa.float64()}
    return pa.schema([(name, types[name]) for name in columns])


def arrow_values(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with values of the types :func:`arrow_types` gives: a stop token id as
    text (a stop string is text), a [token, logprob] pair as {"token", "logprob"} (Arrow
    lists hold one type). Values already in that form are kept, so it applies twice safely."""
    for holder in [record, *(record.get(SAMPLES) or [])]:
        if isinstance(holder.get("stop_reason"), int):
            holder["stop_reason"] = str(holder["stop_reason"])
    pairs = record.get(LOGPROBS[0])
    if pairs:
        record[LOGPROBS[0]] = [{"token": p[0], "logprob": p[1]} if isinstance(p, (list, tuple)) else p
                               for p in pairs]
    return record


def _tool_fields(o: Output) -> Dict[str, Any]:
    """An output's content and calls (OpenAI's shape, ready for the next turn's messages)."""
    return {"content": o.content, "tool_calls": [c.to_openai() for c in o.tool_calls or ()]}


def _error_fields(o: Optional[Output]) -> Dict[str, Optional[str]]:
    """An output's error message and code (the ErrorCode's value): both null when it did not fail."""
    if o is None or o.finish_reason != "error":
        return {"error": None, "error_code": None}
    return {"error": o.error, "error_code": None if o.error_code is None else o.error_code.value}
