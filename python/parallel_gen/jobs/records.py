"""The output row of a job: the input's fields plus what generation produced."""

from __future__ import annotations

from typing import Any, Collection, Dict, Optional

from ..results import Completion, Output

OUTPUT_COLUMNS = ("row", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error")
"""Columns every output row has, after the input's own fields."""
TOOL_COLUMNS = ("content", "tool_calls")
"""Columns every output row of a job with tools also has."""
RENAMED_PREFIX = "input_"
"""An input field named like an output column is carried as ``input_<name>``."""


def carried(fields: Dict[str, Any], output_columns: Collection[str] = OUTPUT_COLUMNS) -> Dict[str, Any]:
    """The input fields as they appear in an output row whose own columns are ``output_columns``."""
    return {(RENAMED_PREFIX + k if k in output_columns else k): v for k, v in fields.items()}


def output_record(row: int, fields: Dict[str, Any], completion: Completion, *, tools: bool = False) -> Dict[str, Any]:
    """One output row: the input fields, then ``row``, the first output's text and
    finish, token counts and error; with ``tools``, ``content`` and ``tool_calls`` (on
    every row, whatever its outcome); ``samples`` when there are several outputs, and
    ``logprobs`` / ``cumulative_logprob`` when they were asked for."""
    rec = carried(fields, OUTPUT_COLUMNS + (TOOL_COLUMNS if tools else ()))
    rec.update(row=row, text=completion.text, finish_reason=completion.finish_reason,
               stop_reason=completion.stop_reason, prompt_tokens=completion.prompt_tokens,
               completion_tokens=completion.completion_tokens, error=_first_error(completion))
    if tools:
        rec.update(_tool_fields(completion.outputs[0]))
    if len(completion.outputs) > 1:
        rec["samples"] = [{"text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                           "completion_tokens": len(o.token_ids), "error": o.error,
                           **(_tool_fields(o) if tools else {})} for o in completion.outputs]
    first = completion.outputs[0]
    if first.logprobs is not None:  # [token text, logprob] per generated token
        rec["logprobs"] = [[t.token, t.logprob] for t in first.logprobs]
        rec["cumulative_logprob"] = first.cumulative_logprob
    return rec


def _tool_fields(o: Output) -> Dict[str, Any]:
    """An output's content and calls (OpenAI's shape, ready for the next turn's messages)."""
    return {"content": o.content, "tool_calls": [c.to_openai() for c in o.tool_calls or ()]}


def _first_error(completion: Completion) -> Optional[str]:
    return next((o.error for o in completion.outputs if o.finish_reason == "error"), None)
