"""Per-row sampling settings: a row's fields named like SamplingParams fields override
the job's settings for that row (``max_tokens``, ``seed``, ``json_schema``, ...).

JSON-typed inputs (JSONL, Parquet) give values as they are; CSV gives text, converted
here to each field's type.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Tuple

from ..params import FIELD_NAMES, SamplingParams, SeedRule


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _json_or_text(text: str) -> Any:
    """A list as JSON text (["a", "b"]), else the text as one item."""
    return json.loads(text) if text.lstrip().startswith("[") else text


def _int_list(text: str) -> Any:
    return json.loads(text) if text.lstrip().startswith("[") else int(text)


def _bias(value: Any) -> Any:
    obj = json.loads(value) if isinstance(value, str) else value
    if isinstance(obj, dict):  # JSON object keys are text: token ids back to ints
        return {int(k): (float(v) if isinstance(v, str) else v) for k, v in obj.items()}
    return obj


# How a CSV cell becomes each field's value; test_jobs checks every field is here.
FROM_TEXT: Dict[str, Callable[[str], Any]] = {
    "n": int, "max_tokens": int, "top_k": int, "repeat_last_n": int, "seed": int, "logprobs": int,
    "temperature": float, "top_p": float, "min_p": float, "repeat_penalty": float,
    "frequency_penalty": float, "presence_penalty": float,
    "ignore_eos": _bool, "cache_prompt": _bool, "stop": _json_or_text, "choices": _json_or_text,
    "stop_token_ids": _int_list, "grammar": str, "json_schema": str, "logit_bias": _bias,
    "grammar_triggers": _json_or_text,
}
if set(FROM_TEXT) != FIELD_NAMES:  # checked at import: a new field must say how a cell becomes it
    raise RuntimeError(f"SamplingParams fields without a CSV conversion: {sorted(FIELD_NAMES - set(FROM_TEXT))}")


def row_params(base: SamplingParams, fields: Dict[str, Any], row: int, cells_are_text: bool,
               ) -> Tuple[Optional[SamplingParams], Optional[str]]:
    """The row's SamplingParams (seed resolved), or why its fields are not valid ones.

    A row's own ``seed`` is used as given; otherwise the job's seed + the row number,
    so a resumed job samples every row as an uninterrupted one would."""
    changes: Dict[str, Any] = {}
    for name in FIELD_NAMES & fields.keys():
        value = fields[name]
        if value is None or (cells_are_text and value == ""):
            continue  # an empty cell: the job's setting
        try:
            if cells_are_text:
                value = FROM_TEXT[name](value)
            elif name == "logit_bias":
                value = _bias(value)
            elif name in ("stop", "choices", "stop_token_ids", "grammar_triggers") and isinstance(value, list):
                value = tuple(value)
            elif isinstance(value, float) and value.is_integer() and FROM_TEXT[name] is int:
                value = int(value)  # JSON and Parquet may give 16.0 for 16
        except (ValueError, TypeError) as e:
            return None, f"column {name!r}: {value!r} is not a valid {name} ({e})"
        changes[name] = value
    try:
        params = base.replace(**changes) if changes else base
    except (ValueError, TypeError) as e:
        return None, f"per-row sampling setting: {e}"
    if "seed" not in changes and base.seed is not None:
        params = SeedRule(base.seed).apply(params, row)
    return params, None
