"""Writers of a job's output rows: append, flush after every row, resume where a killed
job stopped.

Rows are written in input order, so a job's output is always a prefix of the finished
output: resuming counts the complete rows, cuts a torn last row (the one being written
when the process died) and appends from there.

Parquet cannot be appended to, so a Parquet job writes a JSONL journal next to the
output (``OUT.journal.jsonl``) and converts it into ``OUT`` when the job completes; the
journal is what a resumed job continues (an already converted ``OUT`` is turned back
into a journal first).
"""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, Optional, Protocol, Tuple

from .formats import STDIN, JobInputError, OutputFormat
from .sources import pyarrow_parquet

logger = logging.getLogger("parallel_gen")

JOURNAL_SUFFIX = ".journal.jsonl"
_CONVERT_BATCH = 4096


class WriteMode(str, enum.Enum):
    """What to do with an output that already exists."""

    NEW = "new"  # refuse it
    OVERWRITE = "overwrite"
    RESUME = "resume"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed job starts: rows already written, and the last one of them."""

    rows_done: int = 0
    last: Optional[Dict[str, Any]] = None
    torn_bytes: int = 0
    """Bytes of a torn last row that were cut off (0 when the file ended cleanly)."""


class ArrowTyped(Protocol):
    """How a job's own columns are typed in Arrow (a RowJob is one): a Parquet output
    gets those types whatever its rows hold (an all-null column included)."""

    def arrow_schema(self) -> Any:
        """The pyarrow schema of the job's columns."""

    def arrow_values(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """``record`` with its values in those types."""


class Sink:
    """Appends output rows to a file or stdout. ``write`` flushes each row."""

    path: Optional[str]

    def write(self, record: Dict[str, Any]) -> None:
        raise NotImplementedError

    def normalize(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        """``fields`` as they would read back from this sink (to compare on resume)."""
        return fields

    def finish(self) -> None:
        """The job is complete: flush and close (Parquet: convert the journal)."""
        self.close()

    def close(self) -> None:
        """Stops writing, keeping what is written (also on an interrupted job)."""


def open_sink(path: Optional[str], fmt: OutputFormat, mode: WriteMode,
              typed: Optional[ArrowTyped] = None) -> Tuple[Sink, ResumePoint]:
    """Opens the output for appending rows, after protecting or scanning what exists
    (``typed``: the types of the job's columns in a Parquet output; else inferred).

    Raises:
        JobInputError: the output exists and ``mode`` is NEW; it cannot be resumed
            (not written by a job, or a format that cannot resume); it cannot be written.
    """
    if path is None or path == STDIN:
        if mode is WriteMode.RESUME:
            raise JobInputError("--resume needs an output file (-o FILE): stdout cannot be resumed")
        if fmt is OutputFormat.PARQUET:
            raise JobInputError("Parquet output needs a file (-o FILE.parquet), not stdout")
        out = sys.stdout
        return _make(fmt, None, out, header_written=False), ResumePoint()
    if fmt is OutputFormat.TEXT and mode is WriteMode.RESUME:
        raise JobInputError(f"{path}: text output cannot be resumed (texts may span lines): "
                            "write JSONL, CSV or Parquet to resume")
    if fmt is OutputFormat.PARQUET:
        return _open_parquet(path, mode, typed)
    point = _prepare(path, mode, fmt)
    try:
        f = open(path, "a" if mode is WriteMode.RESUME else "w", encoding="utf-8", newline="")
    except OSError as e:
        raise JobInputError(f"cannot write {path}: {e.strerror}") from None
    sink = _make(fmt, path, f, header_written=point.last is not None or _nonempty(path), owned=True)
    if isinstance(sink, CsvSink) and point.last is not None:
        sink.columns = list(point.last)
    return sink, point


def _exists_message(path: str) -> str:
    return (f"{path} already exists: pass --overwrite to replace it, or --resume to continue the job that "
            "wrote it (overwrite=True / resume=True from Python)")


def _prepare(path: str, mode: WriteMode, fmt: OutputFormat) -> ResumePoint:
    exists = os.path.exists(path)
    if exists and os.path.isdir(path):
        raise JobInputError(f"cannot write {path}: it is a directory")
    if exists and mode is WriteMode.NEW:
        raise JobInputError(_exists_message(path))
    if mode is WriteMode.RESUME and exists:
        return scan_csv(path) if fmt is OutputFormat.CSV else scan_jsonl(path)
    return ResumePoint()


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _make(fmt: OutputFormat, path: Optional[str], f: IO[str], header_written: bool, owned: bool = False) -> Sink:
    if fmt is OutputFormat.CSV:
        return CsvSink(path, f, header_written, owned)
    if fmt is OutputFormat.TEXT:
        return TextSink(path, f, owned)
    return JsonlSink(path, f, owned)


# -- JSONL ---------------------------------------------------------------------------------
def _json_line(record: Dict[str, Any]) -> str:
    # default=str: values JSON has no type for (a Parquet timestamp, say) are kept as text.
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class JsonlSink(Sink):
    def __init__(self, path: Optional[str], f: IO[str], owned: bool) -> None:
        self.path, self._f, self._owned = path, f, owned

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(_json_line(record))
        self._f.flush()

    def normalize(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        return json.loads(json.dumps(fields, default=str))

    def close(self) -> None:
        if self._owned and not self._f.closed:
            self._f.close()


def scan_jsonl(path: str) -> ResumePoint:
    """Counts the complete rows of a job's JSONL output and cuts a torn last line."""
    good, rows, last = 0, 0, None
    with open(path, "rb") as f:
        for line in f:
            rec = _parse_row(line) if line.endswith(b"\n") else None
            if rec is None or rec.get("row") != rows:
                # Each row is one line ending in its only raw newline: a torn write is a
                # last line without one. Anything else was not written by a job.
                if not line.endswith(b"\n") and not f.read(1):
                    break
                raise JobInputError(_not_ours(path, rows, line))
            good += len(line)
            rows += 1
            last = rec
        size = f.seek(0, io.SEEK_END)
    return _cut(path, good, size, rows, last)


def _parse_row(line: bytes) -> Optional[Dict[str, Any]]:
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _not_ours(path: str, rows: int, line: bytes) -> str:
    shown = line[:80].decode("utf-8", "replace").rstrip()
    return (f"--resume: {path} row {rows} ({shown!r}) is not row {rows} of a parallel-gen job's output; "
            "it cannot be resumed (--overwrite replaces it)")


def _cut(path: str, good: int, size: int, rows: int, last: Optional[Dict[str, Any]]) -> ResumePoint:
    if size > good:
        logger.warning("%s: the last row was torn (%d bytes, the job was killed while writing it): "
                       "removed; it will be written again", path, size - good)
        with open(path, "r+b") as f:
            f.truncate(good)
    return ResumePoint(rows, last, size - good)


# -- CSV -----------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, default=str)  # lists, dicts: JSON text


class CsvSink(Sink):
    """One header line, then one record per row. Nested values (samples, messages) are
    JSON text; None is an empty cell. The columns are the first row's."""

    def __init__(self, path: Optional[str], f: IO[str], header_written: bool, owned: bool) -> None:
        self.path, self._f, self._owned = path, f, owned
        self._writer = csv.writer(f, lineterminator="\n")
        self.columns: Optional[List[str]] = None
        self._header_written = header_written
        self._warned = False

    def write(self, record: Dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(record)
        if not self._header_written:
            self._writer.writerow(self.columns)
            self._header_written = True
        extra = [k for k in record if k not in self.columns]
        if extra and not self._warned:
            self._warned = True
            logger.warning("%s: row %s has fields the first row had not (%s): CSV keeps the first row's "
                           "columns; write JSONL or Parquet to keep every field", self.path or "<stdout>",
                           record.get("row"), ", ".join(map(str, extra)))
        self._writer.writerow([_cell(record.get(c)) for c in self.columns])
        self._f.flush()

    def normalize(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        return {k: _cell(v) for k, v in fields.items()}

    def close(self) -> None:
        if self._owned and not self._f.closed:
            self._f.close()


def scan_csv(path: str) -> ResumePoint:
    """Counts the complete records of a job's CSV output and cuts a torn last one.

    csv.reader pulls one physical line at a time and no more than a record needs, so the
    bytes consumed when it yields a record end exactly at that record's end."""
    consumed, ended = [0], [True]  # bytes read so far; whether the last line read was whole
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)

        def lines() -> Iterator[str]:
            for raw in f:
                consumed[0] += len(raw)
                ended[0] = raw.endswith(b"\n")
                yield raw.decode("utf-8", "replace")

        reader = csv.reader(lines())
        header = next(_records(reader), None)
        if header is None or not ended[0]:  # empty, or a torn header (the first write cut short)
            return _cut(path, 0, size, 0, None)
        if "row" not in header:
            raise JobInputError(f"--resume: {path} has no 'row' column: it is not a parallel-gen job's output "
                                "(--overwrite replaces it)")
        good, rows, last = consumed[0], 0, None
        at = header.index("row")
        for cells in _records(reader):
            if not ended[0] or len(cells) != len(header) or cells[at] != str(rows):
                if consumed[0] < size:
                    raise JobInputError(f"--resume: {path} record {rows + 1} is not row {rows} of a parallel-gen "
                                        "job's output; it cannot be resumed (--overwrite replaces it)")
                break
            good, rows, last = consumed[0], rows + 1, dict(zip(header, cells))
    return _cut(path, good, size, rows, last if last is not None else dict.fromkeys(header))


def _records(reader: Iterator[List[str]]) -> Iterator[List[str]]:
    """csv records; a record cut inside a quoted cell at the end of the file (a torn
    write) ends the iteration like the end of the file does."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield []  # not a whole record: the caller treats it as torn (or foreign)
            return


# -- text ----------------------------------------------------------------------------------
class TextSink(Sink):
    """The generated texts alone, every sample of every row, separated by a blank line."""

    def __init__(self, path: Optional[str], f: IO[str], owned: bool) -> None:
        self.path, self._f, self._owned = path, f, owned
        self._first = True

    def write(self, record: Dict[str, Any]) -> None:
        samples = record.get("samples") or [record]
        for s in samples:
            if not self._first:
                self._f.write("\n")
            self._first = False
            self._f.write((s["text"] if s["finish_reason"] != "error" else f"[error: {s['error']}]") + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._owned and not self._f.closed:
            self._f.close()


# -- Parquet -------------------------------------------------------------------------------
class ParquetSink(Sink):
    """A JSONL journal while the job runs; ``finish`` converts it into the Parquet file."""

    def __init__(self, path: str, journal: JsonlSink, typed: Optional[ArrowTyped]) -> None:
        self.path = path
        self._journal = journal
        self._typed = typed

    @property
    def journal_path(self) -> str:
        return self.path + JOURNAL_SUFFIX

    def write(self, record: Dict[str, Any]) -> None:
        self._journal.write(record)

    def normalize(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        return self._journal.normalize(fields)

    def finish(self) -> None:
        self._journal.close()
        try:
            journal_to_parquet(self.journal_path, self.path, self._typed)
        except (ValueError, TypeError, OSError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError are ValueError/TypeError
            raise JobInputError(f"cannot write {self.path}: {e}; every row is kept in {self.journal_path} "
                                "(JSONL)") from None
        os.remove(self.journal_path)

    def close(self) -> None:
        self._journal.close()


def _open_parquet(path: str, mode: WriteMode, typed: Optional[ArrowTyped]) -> Tuple[Sink, ResumePoint]:
    pq = pyarrow_parquet()
    journal = path + JOURNAL_SUFFIX
    existing = [p for p in (path, journal) if os.path.exists(p)]
    if existing and mode is WriteMode.NEW:
        raise JobInputError(_exists_message(existing[0]))
    if mode is WriteMode.OVERWRITE:
        for p in existing:
            os.remove(p)
    point = ResumePoint()
    if mode is WriteMode.RESUME:
        if os.path.exists(path) and not os.path.exists(journal):
            _parquet_to_journal(pq, path, journal)  # a finished job, resumed with more rows
        if os.path.exists(journal):
            point = scan_jsonl(journal)
    try:
        f = open(journal, "a" if mode is WriteMode.RESUME else "w", encoding="utf-8")
    except OSError as e:
        raise JobInputError(f"cannot write {journal}: {e.strerror}") from None
    return ParquetSink(path, JsonlSink(journal, f, owned=True), typed), point


def _parquet_to_journal(pq: Any, path: str, journal: str) -> None:
    tmp = journal + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_CONVERT_BATCH):
            for rec in batch.to_pylist():
                out.write(_json_line(rec))
    os.replace(tmp, journal)


def _journal_batches(journal: str, typed: Optional[ArrowTyped]) -> Iterator[List[Dict[str, Any]]]:
    batch: List[Dict[str, Any]] = []
    with open(journal, "rb") as f:
        for line in f:
            rec = json.loads(line)
            batch.append(typed.arrow_values(rec) if typed is not None else rec)
            if len(batch) == _CONVERT_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def journal_to_parquet(journal: str, path: str, typed: Optional[ArrowTyped] = None) -> None:
    """Converts a job's JSONL journal into a Parquet file, a batch at a time: one pass
    to find a schema every batch fits, one to write (memory stays one batch). The job's
    columns get ``typed``'s types; the input's are inferred."""
    import pyarrow as pa

    pq = pyarrow_parquet()
    schemas = [pa.Table.from_pylist(b).schema for b in _journal_batches(journal, typed)]
    if not schemas:
        pq.write_table(pa.table({"row": pa.array([], pa.int64())}), path)
        return
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if typed is not None:
        fixed = typed.arrow_schema()
        schema = pa.schema([fixed.field(f.name) if f.name in fixed.names else f for f in schema])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in _journal_batches(journal, typed):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    os.replace(tmp, path)
