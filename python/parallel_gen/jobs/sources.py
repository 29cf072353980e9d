"""Lazy readers of a job's input: text, JSONL, CSV and Parquet, one InputRow at a time.

A row that cannot be used (malformed JSON, no prompt cell, bad UTF-8) is still yielded,
with ``error`` set, so the job writes an error row for it and goes on: row numbers stay
aligned with the input, which is what resuming relies on.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional

from .formats import STDIN, InputFormat, JobInputError, input_format_for

# Long prompts are the point of some jobs: lift csv's 128 KiB cell limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
_PARQUET_BATCH = 1024


@dataclass
class InputRow:
    """One input row: its fields as read, and the prompt or conversation in them."""

    row: int
    """0-based position among the input's rows (blank lines of text and JSONL are not rows)."""
    where: str
    """"file:line" (or "file row N"), for messages."""
    fields: Dict[str, Any] = field(default_factory=dict)
    """Every field of the input row, carried into the output row unchanged."""
    prompt: Optional[str] = None
    messages: Optional[List[Any]] = None
    error: Optional[str] = None
    """Why the row cannot be generated for; the job writes it as an error row."""


@dataclass(frozen=True)
class Columns:
    """Which input fields hold the prompt or the conversation."""

    prompt: str = "prompt"
    messages: Optional[str] = "messages"
    """None: a job of plain texts only (classify), where no field holds a conversation."""
    option: str = "--prompt-column / prompt_column="
    """How the user names the prompt field, for messages."""

    def wanted(self) -> str:
        """The fields a row needs, for messages: "'prompt' or 'messages'"."""
        return repr(self.prompt) if self.messages is None else f"{self.prompt!r} or {self.messages!r}"

    def present(self, names: Iterable[Any]) -> bool:
        """Whether the field names of a header (or JSON object) include the prompt or messages."""
        return any(n is not None and n in names for n in (self.prompt, self.messages))


@dataclass
class Source:
    """An opened input: its rows (lazy), its name, and its row count when cheap to know."""

    name: str
    format: InputFormat
    rows: Iterator[InputRow]
    total: Optional[int]
    close: Callable[[], None] = lambda: None


def open_source(path: Optional[str], input_format: "str | InputFormat" = "auto",
                columns: Columns = Columns(), *, stdin: Optional[IO[bytes]] = None,
                count_rows: bool = True) -> Source:
    """Opens ``path`` (``"-"`` or None: stdin) for lazy reading.

    "auto" picks the format from the extension; without a telling one (stdin, say) the
    source is JSONL when its first non-blank line is a JSON object with the prompt or
    messages field, else text. A first line that is a JSON object without them is an
    error, not text: each JSON line would silently become a prompt.

    Raises:
        JobInputError: the file cannot be opened, the format needs a missing library, or
            "auto" found a JSON object without the prompt or messages field.
    """
    name = "<stdin>" if path in (None, STDIN) else os.fspath(path)  # type: ignore[arg-type]
    fmt = input_format_for(None if path is None else os.fspath(path), input_format)
    if fmt is InputFormat.PARQUET:
        if path in (None, STDIN):
            raise JobInputError("Parquet input must be a file, not stdin")
        return _open_parquet(name, columns)
    if path in (None, STDIN):
        raw: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
        close: Callable[[], None] = lambda: None
    else:
        try:
            raw = open(name, "rb")
        except OSError as e:
            raise JobInputError(f"cannot read {name}: {e.strerror}") from None
        close = raw.close
    lines: Iterator[bytes] = iter(raw)
    if fmt is InputFormat.AUTO:
        try:
            fmt, lines = _sniff(lines, columns, name)
        except JobInputError:
            close()
            raise
    total = None
    # A second pass over a regular file only: a pipe (-f <(...)) can be read once.
    if count_rows and os.path.isfile(name) and fmt in (InputFormat.TEXT, InputFormat.JSONL):
        total = _count_nonblank_lines(name)
    readers = {InputFormat.TEXT: _text_rows, InputFormat.JSONL: _jsonl_rows, InputFormat.CSV: _csv_rows}
    return Source(name, fmt, readers[fmt](lines, name, columns), total, close)


def _sniff(lines: Iterator[bytes], columns: Columns, name: str) -> "tuple[InputFormat, Iterator[bytes]]":
    """Reads up to the first non-blank line and puts what it read back in front."""
    seen: List[bytes] = []
    fmt = InputFormat.TEXT
    for line in lines:
        seen.append(line)
        if line.strip():
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                obj = None
            if isinstance(obj, dict) and columns.present(obj):
                fmt = InputFormat.JSONL
            elif isinstance(obj, dict):
                fields = ", ".join(map(repr, list(obj)[:8])) or "none"
                raise JobInputError(f"{name}: the first line is a JSON object without a {columns.wanted()} field "
                                    f"(its fields: {fields}): name the field with {columns.option}, or give "
                                    f"--input-format text (input_format='text') to use each line as it is")
            break
    return fmt, itertools.chain(seen, lines)


def _count_nonblank_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in _nonblank(f, path))


def _decode(line: bytes, where: str) -> "tuple[Optional[str], Optional[str]]":
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 text ({e.reason} at byte {e.start})"


def _nonblank(lines: Iterable[bytes], name: str) -> "Iterator[tuple[int, str, bytes]]":
    """(row number, "file:line", line) of every non-blank line: blank lines are not rows."""
    row = 0
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield row, f"{name}:{n}", line
            row += 1


def _text_rows(lines: Iterable[bytes], name: str, columns: Columns) -> Iterator[InputRow]:
    for row, where, line in _nonblank(lines, name):
        text, error = _decode(line.rstrip(b"\r\n"), where)
        yield InputRow(row, where, {columns.prompt: text} if text is not None else {}, prompt=text, error=error)


def _jsonl_rows(lines: Iterable[bytes], name: str, columns: Columns) -> Iterator[InputRow]:
    for row, where, line in _nonblank(lines, name):
        text, error = _decode(line, where)
        obj: Any = None
        if text is not None:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                error = f"{where}: not valid JSON ({e.msg})"
            else:
                if not isinstance(obj, dict):
                    error = (f"{where}: expected a JSON object with {columns.wanted()}, "
                             f"got {type(obj).__name__}")
        yield row_from_fields(row, where, obj if isinstance(obj, dict) else {}, columns, error)


def _csv_rows(lines: Iterable[bytes], name: str, columns: Columns) -> Iterator[InputRow]:
    text = io.TextIOWrapper(_LineReader(lines), encoding="utf-8", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    except UnicodeDecodeError as e:
        raise JobInputError(f"{name}: not UTF-8 text ({e.reason})") from None
    if not columns.present(header):
        raise JobInputError(f"{name}: no {columns.wanted()} column in the header "
                            f"{header}: name the column with {columns.option}")
    row = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as e:  # the stream cannot be resynchronised: stop the job
            raise JobInputError(f"{name}: not UTF-8 text after row {row} ({e.reason})") from None
        except csv.Error as e:
            raise JobInputError(f"{name} line {reader.line_num}: malformed CSV ({e})") from None
        if not any(c.strip() for c in cells):
            continue
        where = f"{name} row {row + 1} (line {reader.line_num})"
        error = None
        if len(cells) != len(header):
            error = f"{where}: {len(cells)} cells for a header of {len(header)} columns"
        fields = dict(zip(header, cells))
        # Empty cells are missing values; a messages cell holds the conversation as JSON text.
        named = (columns.prompt, columns.messages)
        parsed: Dict[str, Any] = {k: v for k, v in fields.items() if v != "" or k not in named}
        if columns.messages is not None and columns.messages in parsed:
            try:
                parsed[columns.messages] = json.loads(parsed[columns.messages])
            except json.JSONDecodeError as e:
                error = error or f"{where}: the {columns.messages!r} cell is not JSON ({e.msg})"
        out = row_from_fields(row, where, parsed, columns, error)
        out.fields = fields  # carried as read
        yield out
        row += 1


class _LineReader(io.RawIOBase):
    """Byte lines (already read ones included) as a raw stream, for TextIOWrapper."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines = iter(lines)
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._rest:
            try:
                self._rest = next(self._lines)
            except StopIteration:
                return 0
        n = min(len(buf), len(self._rest))
        buf[:n], self._rest = self._rest[:n], self._rest[n:]
        return n


def _open_parquet(name: str, columns: Columns) -> Source:
    pq = pyarrow_parquet()
    try:
        f = pq.ParquetFile(name)
    except OSError as e:
        raise JobInputError(f"cannot read {name}: {e}") from None
    except Exception as e:  # pyarrow.ArrowInvalid: not a Parquet file
        raise JobInputError(f"{name} is not a Parquet file: {e}") from None
    names = f.schema_arrow.names
    if not columns.present(names):
        raise JobInputError(f"{name}: no {columns.wanted()} column (it has {names}): "
                            f"name the column with {columns.option}")

    def rows() -> Iterator[InputRow]:
        row = 0
        for batch in f.iter_batches(batch_size=_PARQUET_BATCH):
            for fields in batch.to_pylist():
                yield row_from_fields(row, f"{name} row {row + 1}", fields, columns, None)
                row += 1

    return Source(name, InputFormat.PARQUET, rows(), f.metadata.num_rows, f.close)


def pyarrow_parquet() -> Any:
    """pyarrow.parquet, or JobInputError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise JobInputError("Parquet needs pyarrow, which is not installed: pip install pyarrow "
                            "(or pip install 'parallel_gen[parquet]')") from None
    return pq


def row_from_fields(row: int, where: str, fields: Dict[str, Any], columns: Columns,
                    error: Optional[str]) -> InputRow:
    """The prompt or conversation of a parsed row; an error when it has neither or both."""
    out = InputRow(row, where, fields, error=error)
    if error is not None:
        return out
    prompt = fields.get(columns.prompt)
    messages = fields.get(columns.messages) if columns.messages is not None else None
    if columns.messages is None and prompt is None:
        out.error = (f"{where}: {columns.prompt!r} is missing or empty (the row has {list(fields)}): "
                     f"name the field with {columns.option}")
    elif (prompt is None) == (messages is None):
        out.error = (f"{where}: give exactly one of {columns.prompt!r} or {columns.messages!r}"
                     + (" (both are set)" if prompt is not None else " (neither is set)"))
    elif prompt is not None:
        if isinstance(prompt, str):
            out.prompt = prompt
        else:
            out.error = f"{where}: {columns.prompt!r} must be a string, got {type(prompt).__name__}"
    elif isinstance(messages, list):
        out.messages = messages
    else:
        out.error = (f"{where}: {columns.messages!r} must be a list of {{\"role\", \"content\"}} objects, "
                     f"got {type(messages).__name__}")
    return out
