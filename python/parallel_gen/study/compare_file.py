"""compare_file: ``parallel-gen compare``'s job. Each coder (model x template) is one
classify file job (jobs/classify_job.py) writing its own part, ``OUTPUT.parts/NN.jsonl``,
streamed and resumable as ``classify`` is; when every part is complete they are joined
into the long table OUTPUT (item, coder, model, template, text, gold, label, p_<label>,
error) as CSV, JSONL or Parquet, by its extension. Each model is loaded once for all of
its templates, sized to all of their prompts. A killed compare continues with ``resume=True``: finished parts are skipped
whole (each keeps its own run record), a cut one resumes after its last row.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..jobs.classify_job import classify_job, probability_column, text_columns
from ..jobs.driver import JobInterrupted, JobSummary, PathLike, check_options, run_rows
from ..jobs.formats import JobInputError, OutputFormat, output_format_for
from ..jobs.sources import open_source, pyarrow_parquet
from .compare import Coder, model_name, open_for_templates, template_variants
from .record import Recorder, RunRecord

PARTS_SUFFIX = ".parts"
_JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class CompareSummary:
    """What a file compare did: one JobSummary per coder run (None: already complete)."""

    output: str
    coders: List[Coder]
    parts: List[Optional[JobSummary]]
    rows: int
    """Rows of the long table (items x coders)."""
    failed: int
    """Rows with an error."""
    gold: Optional[List[str]]


def parts_dir(output: PathLike) -> str:
    return os.fspath(output) + PARTS_SUFFIX


def compare_file(models: Sequence[PathLike], input: PathLike, output: PathLike, labels: Sequence[str], *,
                 templates: Optional[Mapping[str, Any]] = None, text_column: str = "text",
                 gold_column: Optional[str] = None, input_format: str = "auto", chat: bool = False,
                 system: Optional[str] = None, normalize: str = "sum", chat_template: Optional[str] = None,
                 resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
                 lookahead: Optional[int] = None, model_options: Optional[Mapping[str, Any]] = None,
                 model_names: Optional[Sequence[str]] = None) -> CompareSummary:
    """Classifies every text of ``input`` with every model x template into the long table
    ``output`` (by extension: JSONL for .jsonl/.json/.ndjson, Parquet for .parquet/.pq,
    which needs pyarrow, else CSV); see the module's text.

    Raises:
        JobInputError, ValueError, TypeError: bad options, an unreadable input, a gold
            column with missing or unknown labels, an output that exists (without
            ``resume`` / ``overwrite``), before any model opens.
        JobInterrupted: Ctrl-C; parts written are kept (resume continues them).
    """
    from .agreement import require_sklearn

    out = os.fspath(output)
    table_format(out)  # Parquet without pyarrow: said before any work
    check_options(progress, lookahead, resume, overwrite)
    options = dict(chat=chat, system=system, normalize=normalize, chat_template=chat_template)
    variants = template_variants(templates)
    jobs = {name: classify_job(labels, template=t, **options) for name, t in variants.items()}
    label_list = next(iter(jobs.values())).options.labels
    names = list(model_names) if model_names is not None else [model_name(m) for m in models]
    if not models or len(names) != len(models) or len(set(names)) != len(names):
        raise JobInputError(f"give one or more models with distinct names (got {names})")
    coders = [Coder(m if templates is None else f"{m}/{t}", m, t) for m in names for t in variants]
    texts, gold = _read_input(input, input_format, text_column, gold_column, label_list)
    if gold is not None or len(coders) >= 2:
        require_sklearn()
    parts = parts_dir(out)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    elif not resume and (os.path.exists(out) or os.path.exists(parts)):
        raise JobInputError(f"{out} (or {parts}) already exists: pass --overwrite to replace it, or --resume to "
                            "continue the compare that wrote it")
    os.makedirs(parts, exist_ok=True)
    arguments = {"labels": label_list, "templates": variants, "models": [os.fspath(m) for m in models],
                 "coders": coders, "text_column": text_column, "gold_column": gold_column, **options}
    record = Recorder.start("compare", out, os.fspath(input), arguments, resume)
    if record is None:  # a file output always has one
        raise RuntimeError(f"no run record for {out}")
    done: List[Optional[JobSummary]] = [None] * len(coders)
    part = [os.path.join(parts, f"{i:02d}.jsonl") for i in range(len(coders))]
    try:
        for name, spec in zip(names, models):
            todo = [i for i, c in enumerate(coders)
                    if c.model == name and not (resume and _complete(part[i], len(texts)))]
            if not todo:
                continue
            # One load per model for all its templates (sized to all of their prompts).
            with open_for_templates(spec, model_options, texts, label_list, variants, options) as opened:
                for i in todo:
                    source = open_source(os.fspath(input), input_format, text_columns(text_column))
                    try:
                        again = resume and os.path.exists(part[i])  # else the part is new, or ours to replace
                        done[i] = run_rows(opened.model, source, part[i], jobs[coders[i].template], resume=again,
                                           overwrite=not again, progress=progress, lookahead=lookahead,
                                           sized=opened.sized.get(coders[i].template))
                    finally:
                        source.close()
    except JobInterrupted:
        record.end(0, 0, 0, interrupted=True)
        raise
    except BaseException as e:
        record.end(0, 0, 0, error=f"{type(e).__name__}: {e}")
        raise
    for i in range(len(coders)):
        for m in RunRecord.read(os.path.join(parts, f"{i:02d}.jsonl")).models:
            if m not in record.record.models:
                record.record.models.append(m)
    rows = _join(out, coders, parts, texts, gold, label_list)
    failed = sum(r["error"] is not None for r in rows)
    record.end(len(rows), sum(s.written for s in done if s is not None), failed)
    return CompareSummary(out, coders, done, len(rows), failed, gold)


def _read_input(input: PathLike, input_format: str, text_column: str, gold_column: Optional[str],
                labels: List[str]) -> "tuple[List[Optional[str]], Optional[List[str]]]":
    """The texts and the gold labels (checked: every row has one, from ``labels``)."""
    source = open_source(os.fspath(input), input_format, text_columns(text_column), count_rows=False)
    texts: List[Optional[str]] = []
    gold: List[str] = []
    try:
        for row in source.rows:
            texts.append(row.prompt)
            if gold_column is None:
                continue
            value = row.fields.get(gold_column)
            if value is None or value == "":
                raise JobInputError(f"{row.where}: no gold label in --gold-column {gold_column!r}: every row "
                                    "needs one (leave unlabelled texts out of the study)")
            if str(value) not in labels:
                raise JobInputError(f"{row.where}: the gold label {value!r} is not one of the labels {labels}")
            gold.append(str(value))
    finally:
        source.close()
    if not texts:
        raise JobInputError(f"no texts in {input}")
    return texts, (gold if gold_column is not None else None)


def _complete(path: str, n: int) -> bool:
    """Whether a part holds all ``n`` rows (its last line complete)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") == n and data.endswith(b"\n")


def _join(out: str, coders: List[Coder], parts: str, texts: List[Optional[str]], gold: Optional[List[str]],
          labels: List[str]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for i, coder in enumerate(coders):
        with open(os.path.join(parts, f"{i:02d}.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                rec = {"item": r["row"], "coder": coder.name, "model": coder.model, "template": coder.template,
                       "text": texts[r["row"]]}
                if gold is not None:
                    rec["gold"] = gold[r["row"]]
                rec["label"] = r["label"]
                rec.update({probability_column(lab): r[probability_column(lab)] for lab in labels})
                rec["error"] = r["error"]
                rows.append(rec)
    tmp = f"{out}.tmp{os.getpid()}"
    fmt = table_format(out)
    if fmt is OutputFormat.PARQUET:
        import pyarrow as pa

        pyarrow_parquet().write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if fmt is OutputFormat.JSONL:
                for rec in rows:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            else:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    os.replace(tmp, out)
    return rows


def table_format(path: str) -> OutputFormat:
    """A codings table's format, by its extension: JSONL (.jsonl, .json, .ndjson), Parquet
    (.parquet, .pq; JobInputError saying how to install pyarrow when it is missing), else CSV."""
    if path.lower().endswith(_JSON_EXTENSIONS):
        return OutputFormat.JSONL
    if output_format_for(path, "auto") is OutputFormat.PARQUET:
        pyarrow_parquet()
        return OutputFormat.PARQUET
    return OutputFormat.CSV


def read_codings(path: PathLike) -> List[Dict[str, Any]]:
    """A codings table (CSV, JSONL or Parquet by extension, as :func:`table_format`) as records."""
    p = os.fspath(path)
    fmt = table_format(p)
    try:
        if fmt is OutputFormat.PARQUET:
            return pyarrow_parquet().read_table(p).to_pylist()
        with open(p, encoding="utf-8", newline="") as f:
            if fmt is OutputFormat.JSONL:
                return [json.loads(line) for line in f if line.strip()]
            return list(csv.DictReader(f))
    except OSError as e:
        raise JobInputError(f"cannot read {p}: {e.strerror or e}") from None
    except (ValueError, csv.Error) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise JobInputError(f"{p}: not a readable codings table ({e})") from None


__all__ = ["CompareSummary", "compare_file", "parts_dir", "read_codings"]
