"""The output row of a job: the input's fields plus what generation produced."""

from __future__ import annotations

from typing import Any, Collection, Dict, Optional

from ..results import Completion

OUTPUT_COLUMNS = ("row", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error")
"""Columns every output row has, after the input's own fields."""
RENAMED_PREFIX = "input_"
"""An input field named like an output column is carried as ``input_<name>``."""


def carried(fields: Dict[str, Any], output_columns: Collection[str] = OUTPUT_COLUMNS) -> Dict[str, Any]:
    """The input fields as they appear in an output row whose own columns are ``output_columns``."""
    return {(RENAMED_PREFIX + k if k in output_columns else k): v for k, v in fields.items()}


def output_record(row: int, fields: Dict[str, Any], completion: Completion) -> Dict[str, Any]:
    """One output row: the input fields, then ``row``, the first output's text and
    finish, token counts and error; ``samples`` when there are several outputs, and
    ``logprobs`` / ``cumulative_logprob`` when they were asked for."""
    rec = carried(fields)
    rec.update(row=row, text=completion.text, finish_reason=completion.finish_reason,
               stop_reason=completion.stop_reason, prompt_tokens=completion.prompt_tokens,
               completion_tokens=completion.completion_tokens, error=_first_error(completion))
    if len(completion.outputs) > 1:
        rec["samples"] = [{"text": o.text, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                           "completion_tokens": len(o.token_ids), "error": o.error} for o in completion.outputs]
    first = completion.outputs[0]
    if first.logprobs is not None:  # [token text, logprob] per generated token
        rec["logprobs"] = [[t.token, t.logprob] for t in first.logprobs]
        rec["cumulative_logprob"] = first.cumulative_logprob
    return rec


def _first_error(completion: Completion) -> Optional[str]:
    return next((o.error for o in completion.outputs if o.finish_reason == "error"), None)
