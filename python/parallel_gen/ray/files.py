"""run_ray_job: Parquet or JSONL files (or directories of them) in, a directory of
Parquet or JSONL files out, generated on a Ray cluster.

Ray Data writes a dataset as a directory of part files (one per block), so the output
is a directory; its run record, ``OUTPUT.run.json``, lies beside it (as a file job's: see
:class:`~parallel_gen.RunRecord`). Ray retries the batch of an actor that dies; a job
whose driver dies is run again from the start (``overwrite=True``): Ray keeps no journal
to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import pyarrow as pa
import ray
import ray.data
import ray.exceptions
from ray.data import SaveMode

from ..config import model_config
from ..jobs.classify_job import classify_job
from ..jobs.formats import InputFormat, JobInputError, OutputFormat, input_format_for, output_format_for
from ..study.record import Recorder, model_file_info
from .batch import INPUT_ERROR_COLUMN, actor_options
from .classify import classify
from .dataset import cache_location, generate_job, generation_job

_READABLE = (InputFormat.PARQUET, InputFormat.JSONL)
_WRITABLE = (OutputFormat.PARQUET, OutputFormat.JSONL)


class RayJobError(RuntimeError):
    """The Ray job failed as a whole (a model an actor cannot load, a cluster lost);
    rows already written stay in the output directory, which a rerun replaces with
    ``overwrite=True``. The message is the root cause, without Ray's tracebacks."""


@dataclass(frozen=True)
class RayJobSummary:
    """What a Ray job did."""

    output: str
    """The output directory."""
    rows: int
    """Rows written."""
    failed: int
    """Rows written with an error."""
    seconds: float
    """Wall time, cluster start included."""


def run_ray_job(address: Optional[str], input: str, output: str, *, model: Optional[str] = None,
                input_format: str = "auto", output_format: str = "auto", overwrite: bool = False,
                actors: int = 1, cpus_per_actor: int = 1, gpus_per_actor: float = 0,
                batch_size: Optional[int] = None, progress: bool = False, **generate_args: Any) -> RayJobSummary:
    """Reads ``input``, generates on the cluster at ``address`` and writes ``output``.

    Args:
        address: a Ray cluster ("auto", "ray://host:10001", ...); None or "" starts a
            local one sized to the actors (and stops it at the end). When Ray is
            already initialised in this process, that cluster is used.
        input: a Parquet or JSONL file, or a directory of them; a path every node can
            read (a shared filesystem, or a URI such as s3://bucket/prompts/).
        output: the output directory (created), readable the same way.
        input_format, output_format: "auto" (by extension; for a directory, by its
            files' extensions), "jsonl" or "parquet".
        overwrite: replace an existing output; without it an existing output is an
            error (JobInputError) and is left untouched.
        actors, cpus_per_actor, gpus_per_actor, batch_size, **generate_args: as for
            :func:`parallel_gen.ray.generate`.
        progress: Ray Data's progress bars on stderr.

    Raises:
        JobInputError: unreadable or missing input, a protected output, a format
            other than Parquet or JSONL.
    """
    pool = dict(actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size)
    # The job, its seed drawn here once: what the actors run and the record says.
    job = generation_job(**{k: generate_args.pop(k) for k in list(generate_args) if k not in _NOT_JOB_ARGS})
    generate_args["cache"] = cache_location(generate_args.get("cache"))
    arguments = {**job.arguments(), **{k: v for k, v in generate_args.items() if k != "model_options"}, **pool}
    return _run_on_ray(address, input, output, lambda ds: generate_job(ds, model, job, **pool, **generate_args),
                       input_format=input_format, output_format=output_format, overwrite=overwrite,
                       cpus=actors * cpus_per_actor, gpus=actors * gpus_per_actor, progress=progress,
                       record=_JobRecord("generate", arguments, model, generate_args.get("model_options"), pool))


def run_ray_classify_job(address: Optional[str], input: str, output: str, labels: Sequence[str], *,
                         model: Optional[str] = None, input_format: str = "auto", output_format: str = "auto",
                         overwrite: bool = False, actors: int = 1, cpus_per_actor: int = 1,
                         gpus_per_actor: float = 0, batch_size: Optional[int] = None, progress: bool = False,
                         **classify_args: Any) -> RayJobSummary:
    """:func:`run_ray_job` for label probabilities (``parallel-gen classify --ray``): the
    rows of :func:`parallel_gen.ray.classify`; ``labels`` and ``**classify_args`` (text_column,
    template, chat, system, normalize, chat_template, model_options) as for it."""
    # bad labels or template: an error before any cluster starts
    job = classify_job(labels, **{k: v for k, v in classify_args.items() if k in _CLASSIFY_OPTIONS})
    pool = dict(actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, batch_size=batch_size)
    arguments = {**job.arguments(), **{k: v for k, v in classify_args.items() if k != "model_options"}, **pool}
    return _run_on_ray(address, input, output, lambda ds: classify(ds, labels, model, **pool, **classify_args),
                       input_format=input_format, output_format=output_format, overwrite=overwrite,
                       cpus=actors * cpus_per_actor, gpus=actors * gpus_per_actor, progress=progress,
                       record=_JobRecord("classify", arguments, model, classify_args.get("model_options"), pool))


_CLASSIFY_OPTIONS = ("template", "chat", "system", "normalize", "chat_template")
_NOT_JOB_ARGS = ("prompt_column", "messages_column", "model_options", "cache")  # generate_job's own


@dataclass(frozen=True)
class _JobRecord:
    """What a Ray job's run record (OUTPUT.run.json, beside the output directory) says
    besides the environment, input and output: the job's kind and arguments, and the
    model as its actors open it."""

    kind: str
    arguments: Dict[str, Any]
    model: Optional[str]
    model_options: Optional[Mapping[str, Any]]
    pool: Dict[str, Any]

    def model_info(self) -> Dict[str, Any]:
        actor = actor_options(self.pool["cpus_per_actor"], self.pool["gpus_per_actor"])
        config = model_config(None, {**actor, **dict(self.model_options or {})})
        path = self.model
        if path is None:
            from ..model_files import ModelNotInstalledError, default_model_path

            try:
                path = os.fspath(default_model_path())  # the one every node installs
            except ModelNotInstalledError:  # not on this node: the actors' own
                return {"name": None, "path": None, "config": dataclasses.asdict(config)}
        return model_file_info(path, config)


def _run_on_ray(address: Optional[str], input: str, output: str,
                transform: Callable[["ray.data.Dataset"], "ray.data.Dataset"], *, input_format: str,
                output_format: str, overwrite: bool, cpus: float, gpus: float, progress: bool,
                record: _JobRecord) -> RayJobSummary:
    """Reads ``input``, maps it with ``transform`` on the cluster and writes ``output``
    with its run record (not for a URI output: the record is a local file)."""
    t0 = time.perf_counter()
    in_fmt = _input_format(input, input_format)
    out_fmt = output_format_for(output, output_format)
    if out_fmt not in _WRITABLE:
        raise JobInputError(f"output_format={out_fmt.value!r}: a Ray job writes 'jsonl' or 'parquet'")
    if os.path.exists(output) and not overwrite:
        raise JobInputError(f"the output {output} exists: --overwrite replaces it (a Ray job does not "
                            "--resume: Ray retries a failed batch itself)")
    recorder = None if "://" in output else Recorder.start(record.kind, output, input, record.arguments, False)
    try:
        if recorder is not None:
            recorder.model_file(record.model_info())
        with _cluster(address, cpus, gpus):
            ray.data.DataContext.get_current().enable_progress_bars = progress
            ds = ray.data.read_parquet(input) if in_fmt is InputFormat.PARQUET else read_jsonl(input)
            out = transform(ds)
            mode = SaveMode.OVERWRITE if overwrite else SaveMode.ERROR
            try:
                if out_fmt is OutputFormat.PARQUET:
                    out.write_parquet(output, mode=mode)
                else:
                    out.write_json(output, mode=mode)
            except ray.exceptions.RayError as e:
                raise RayJobError(f"the Ray job failed: {root_cause(e)}") from None
            rows, failed = _count(output, out_fmt)
    except KeyboardInterrupt:
        if recorder is not None:
            recorder.end(0, 0, 0, interrupted=True)
        raise
    except BaseException as e:
        if recorder is not None:
            recorder.end(0, 0, 0, error=f"{type(e).__name__}: {e}")
        raise
    if recorder is not None:
        recorder.end(rows, rows, failed)
    return RayJobSummary(output, rows, failed, time.perf_counter() - t0)


_EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$", re.MULTILINE)
_RAY_WRAPPERS = {"RayTaskError", "RayActorError", "ActorDiedError", "UserCodeException", "SystemException",
                 "RayError"}


def root_cause(error: BaseException) -> str:
    """The first exception raised in user code that Ray's wrappers quote in their text
    (the model that cannot be loaded, say), as "Type: message"; else the error's last line."""
    texts = []
    while error is not None and len(texts) < 8:
        texts.append(str(error))
        error = getattr(error, "cause", None) or error.__cause__  # type: ignore[assignment]
    for text in texts:
        for m in _EXCEPTION_LINE.finditer(text):
            if m.group(1) not in _RAY_WRAPPERS and not m.group(1).startswith("Ray"):
                return f"{m.group(1)}: {m.group(2).strip()}"
    lines = [line for line in texts[0].splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


def read_jsonl(path: str) -> "ray.data.Dataset":
    """The JSONL file(s) at ``path``, one row per non-blank line; a line that is not a
    JSON object becomes a row with only its error (the job writes it as an error row)
    instead of failing the whole read, as ray.data.read_json would."""
    return ray.data.read_text(path, drop_empty_lines=True).map_batches(_parse_jsonl, batch_format="pyarrow")


def _parse_jsonl(batch: pa.Table) -> pa.Table:
    records: List[Dict[str, Any]] = []
    for line in batch.column("text").to_pylist():
        try:
            obj = json.loads(line)
            error = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
        except json.JSONDecodeError as e:
            error = f"not valid JSON ({e.msg})"
        if error is not None:
            snippet = line if len(line) <= 80 else line[:77] + "..."
            obj = {INPUT_ERROR_COLUMN: f"JSONL line {snippet!r}: {error}"}
        records.append(obj)
    names = list(dict.fromkeys(k for rec in records for k in rec))  # every row's keys, in order
    if INPUT_ERROR_COLUMN not in names:
        names.append(INPUT_ERROR_COLUMN)
    return pa.Table.from_pydict({k: [rec.get(k) for rec in records] for k in names})


def _input_format(path: str, given: str) -> InputFormat:
    if not os.path.exists(path) and "://" not in path:
        raise JobInputError(f"cannot read {path}: no such file or directory")
    fmt = input_format_for(path, given)
    if fmt is InputFormat.AUTO and os.path.isdir(path):
        found = {input_format_for(name, "auto") for name in os.listdir(path)} - {InputFormat.AUTO}
        if len(found) == 1:
            fmt = found.pop()
    if fmt not in _READABLE:
        raise JobInputError(f"{path}: a Ray job reads Parquet or JSONL (by extension, or --input-format "
                            f"parquet/jsonl), not {fmt.value!r}")
    return fmt


@contextlib.contextmanager
def _cluster(address: Optional[str], cpus: float, gpus: float) -> Iterator[None]:
    """Connects to ``address``, or starts a local cluster with the actors' CPUs plus one
    for the read and write tasks (an actor pool holding every CPU starves them)."""
    if not join_cluster(address, cpus, gpus):
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()


def join_cluster(address: Optional[str], cpus: float, gpus: float) -> bool:
    """Connects to ``address``, or starts a local cluster with ``cpus`` plus one (for the
    tasks beside the actors: an actor pool holding every CPU starves them). False when
    this process was already connected (the caller then leaves the cluster as it is)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=int(cpus) + 1, num_gpus=gpus or None, include_dashboard=False, log_to_driver=False)
    return True


def _count(output: str, fmt: OutputFormat) -> "tuple[int, int]":
    """(rows, rows with an error) of the written output, read back by the cluster."""
    ds = ray.data.read_parquet(output, columns=["error"]) if fmt is OutputFormat.PARQUET \
        else ray.data.read_json(output, lines=True)
    rows = failed = 0
    for batch in ds.select_columns(["error"]).iter_batches(batch_format="pyarrow"):
        rows += batch.num_rows
        # not null_count: JSON blocks whose errors are all null read as another type than
        # blocks with one, and Ray then falls back to pickled objects (nulls become NaN)
        failed += sum(isinstance(e, str) for e in batch.column("error").to_pylist())
    return rows, failed


