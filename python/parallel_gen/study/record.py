"""The run record: ``OUTPUT.run.json`` beside a file job's output, saying exactly what
produced it (software and its build, machine, model files and their SHA-256, settings,
arguments, command line, input hash), one segment per run (a resume appends one), and
the SHA-256 of the output when the last segment ended. :class:`RunRecord` reads it.

A resumed job whose input's hash differs from the recorded one is refused (its rows
would mix two inputs), unless the recorded input is a prefix of it: rows appended to a
text, JSONL or CSV input since.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

if TYPE_CHECKING:
    from ..model import Model

RECORD_SUFFIX = ".run.json"
FORMAT = 1
_HASHES: Dict[Tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256: a model file is hashed once


def record_path(output: Union[str, "os.PathLike[str]"]) -> str:
    """The run record of ``output``: ``OUTPUT.run.json``."""
    return os.fspath(output) + RECORD_SUFFIX


def sha256_file(path: Union[str, "os.PathLike[str]"]) -> str:
    """The SHA-256 of a file's bytes (hex), remembered per (path, size, mtime)."""
    p = os.fspath(path)
    st = os.stat(p)
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _file_info(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """A file's path, size and SHA-256; a directory's (a Ray job's input or output) with
    its file count and a SHA-256 over its files' relative paths and SHA-256s."""
    if path is not None and os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)
        h = hashlib.sha256()
        for rel in files:
            h.update(f"{rel}\0{sha256_file(os.path.join(path, rel))}\n".encode("utf-8"))
        return {"path": os.path.abspath(path), "bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files),
                "files": len(files), "sha256": h.hexdigest()}
    if path is None or not os.path.isfile(path):
        return None  # stdin, arguments, a pipe, a URI: nothing to hash again
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, Any]:
    """Software versions and build, and the machine."""
    import llama_cpp

    import parallel_gen

    from .._native import _core

    return {
        "parallel_gen": parallel_gen.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp": {"libllama": _core.libllama_path(), "backends": list(_core.backends()),
                      "system_info": _core.system_info().strip()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu_offload": bool(_core.supports_gpu_offload()),
    }


def model_info(model: "Model") -> Dict[str, Any]:
    """A Model's file (name, size, SHA-256) and its ModelConfig."""
    return model_file_info(model.path, model.config)


def model_file_info(path: Union[str, "os.PathLike[str]"], config: Any) -> Dict[str, Any]:
    """A model file (name, size, SHA-256: when this process can read it) and the
    ModelConfig it is (or was) opened with."""
    p = os.fspath(path)
    info = _file_info(p) or {"path": p}
    return {"name": os.path.basename(p), **info, "config": dataclasses.asdict(config)}


def json_ready(x: Any) -> Any:
    """Arguments as JSON values: dataclasses as dicts, enums as their values, functions by
    name, the rest as str."""
    if isinstance(x, enum.Enum):
        return json_ready(x.value)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return json_ready(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [json_ready(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else str(x)
    if callable(x):
        return f"<function {getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}>"
    return str(x)


@dataclass
class RunRecord:
    """A job's run record (``OUTPUT.run.json``): read one with :meth:`read`."""

    kind: str
    """"generate", "classify" or "compare"."""
    environment: Dict[str, Any]
    """parallel_gen, llama-cpp-python and llama.cpp versions and build; Python, OS, CPU, cores, GPU."""
    command: List[str]
    """The command line of the process that started the first segment (sys.argv)."""
    input: Optional[Dict[str, Any]]
    """The input file's path, size and SHA-256 (a directory's: also its file count; None:
    stdin, arguments or a URI)."""
    arguments: Dict[str, Any]
    """Every generation / classify argument of the job."""
    models: List[Dict[str, Any]] = field(default_factory=list)
    """Each model file's name, path, size, SHA-256 and ModelConfig (a Ray job's: the one
    its actors open, where n_ctx None means each actor sized it to its first batch)."""
    segments: List[Dict[str, Any]] = field(default_factory=list)
    """One per run (a resume appends one): started, ended, command, rows_before, written,
    failed, interrupted, error."""
    output: Optional[Dict[str, Any]] = None
    """The output's path, rows and SHA-256 when the last segment ended."""
    format: int = FORMAT

    @classmethod
    def read(cls, path: Union[str, "os.PathLike[str]"]) -> "RunRecord":
        """Reads a record: its own path, or the output file's (``OUTPUT.run.json`` is read)."""
        p = os.fspath(path)
        if not p.endswith(RECORD_SUFFIX):
            p = record_path(p)
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str) -> None:
        """Writes the record atomically (a reader never sees half of it)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @property
    def rows(self) -> int:
        """Rows in the output when the last segment ended."""
        return int((self.output or {}).get("rows") or 0)

    @property
    def failed(self) -> int:
        """Rows written with an error, over all segments."""
        return sum(int(s.get("failed") or 0) for s in self.segments)

    def verify(self) -> bool:
        """Whether the output's SHA-256 (a file's, or a directory's over its files) is
        still the recorded one."""
        out = self.output or {}
        now = _file_info(out.get("path"))
        return now is not None and now["sha256"] == out.get("sha256")


def _appended(path: str, size: int, sha256: str) -> bool:
    """Whether the file's first ``size`` bytes have SHA-256 ``sha256``: rows were appended
    to the recorded input (a text, JSONL or CSV file grown since), which resuming allows."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return False
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest() == sha256


class Recorder:
    """Writes a job's record: :meth:`start` before any row (it refuses a resume against a
    changed input), :meth:`model` when a model is open, :meth:`end` after the run."""

    def __init__(self, output: str, record: RunRecord) -> None:
        self.path = record_path(output)
        self.output = output
        self.record = record

    @classmethod
    def start(cls, kind: str, output: Optional[str], input: Optional[str], arguments: Mapping[str, Any],
              resume: bool, rows_before: int = 0) -> "Optional[Recorder]":
        """A Recorder for a job writing ``output`` (None for stdout: no record); with
        ``resume``, the existing record gets a new segment.

        Raises:
            JobInputError: resume with an input whose SHA-256 is not the recorded one.
        """
        from ..jobs.formats import JobInputError

        if output is None:
            return None
        path = record_path(output)
        input_info = _file_info(input)
        record = None
        if resume and os.path.isfile(path):
            try:
                record = RunRecord.read(path)
            except (OSError, ValueError, TypeError):
                record = None  # unreadable: a new one
            if record is not None and record.input and input_info:
                old, new = record.input, input_info
                if old["sha256"] != new["sha256"] and not _appended(new["path"], old["bytes"], old["sha256"]):
                    raise JobInputError(f"--resume: {input} is not the input of the run record {path} (SHA-256 "
                                        f"{new['sha256'][:12]}... for {old['sha256'][:12]}..., nor that input with "
                                        "rows appended): it changed since the job started, or the output is that "
                                        "of another input; resuming would mix two inputs (--overwrite starts again)")
                record.input = input_info  # what this segment reads (the same, or with rows appended)
        if record is None:
            record = RunRecord(kind, environment(), list(sys.argv), input_info, json_ready(dict(arguments)))
        record.segments.append({"started": _now(), "ended": None, "command": list(sys.argv),
                                "input_sha256": (input_info or {}).get("sha256"),
                                "rows_before": rows_before, "written": 0, "failed": 0, "interrupted": False,
                                "error": None})
        rec = cls(output, record)
        rec.record.write(rec.path)
        return rec

    def model(self, model: "Model") -> None:
        """Adds an open Model's file and settings (once per file and settings)."""
        self.model_file(model_info(model))

    def model_file(self, info: Dict[str, Any]) -> None:
        """Adds a model as :func:`model_file_info` describes it (a model that other
        processes open: a Ray job's actors)."""
        if info not in self.record.models:
            self.record.models.append(info)
            self.record.write(self.path)

    def end(self, rows: int, written: int, failed: int, interrupted: bool = False,
            error: Optional[str] = None) -> None:
        """Closes the segment: what it did, and the output's SHA-256 now."""
        seg = self.record.segments[-1]
        seg.update(ended=_now(), written=written, failed=failed, interrupted=interrupted, error=error)
        info = _file_info(self.output) or {"path": os.path.abspath(self.output)}
        self.record.output = {**info, "rows": rows}
        self.record.write(self.path)


__all__ = ["RECORD_SUFFIX", "Recorder", "RunRecord", "environment", "model_file_info", "model_info", "record_path",
           "sha256_file"]
