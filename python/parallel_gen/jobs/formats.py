"""File formats of batch jobs, and how a format is chosen for a path."""

from __future__ import annotations

import enum
import os
from typing import Optional


class InputFormat(str, enum.Enum):
    """How the prompts of a job are stored."""

    AUTO = "auto"
    TEXT = "text"  # one prompt per line
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class OutputFormat(str, enum.Enum):
    """How the rows of a job's output are stored."""

    AUTO = "auto"
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"
    TEXT = "text"  # the generated texts alone: for reading, not for resuming


_BY_EXTENSION = {
    ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}

STDIN = "-"


class JobInputError(ValueError):
    """The job cannot start: unreadable input, a protected output, a bad option.
    The message names the file and what to do."""


def _enum_value(cls: type, name: str, value: object) -> "enum.Enum":
    try:
        return cls(value)  # type: ignore[call-arg]
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise JobInputError(f"{name}={value!r}: must be one of {choices}") from None


def input_format_for(path: Optional[str], given: "str | InputFormat") -> InputFormat:
    """The format asked for; for "auto", the one the extension names, or AUTO when the
    extension says nothing (the source is then sniffed: see sources.open_source)."""
    fmt = _enum_value(InputFormat, "input_format", given)
    if fmt is not InputFormat.AUTO or path is None or path == STDIN:
        return fmt  # type: ignore[return-value]
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return InputFormat(_BY_EXTENSION[ext]) if ext in _BY_EXTENSION else InputFormat.AUTO


def output_format_for(path: Optional[str], given: "str | OutputFormat") -> OutputFormat:
    """The format asked for; for "auto", the one the extension names, else JSONL."""
    fmt = _enum_value(OutputFormat, "output_format", given)
    if fmt is not OutputFormat.AUTO:
        return fmt  # type: ignore[return-value]
    if path is None or path == STDIN:
        return OutputFormat.JSONL
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return OutputFormat(_BY_EXTENSION.get(ext, "jsonl"))
