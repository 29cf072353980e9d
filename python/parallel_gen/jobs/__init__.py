"""Batch jobs: prompts streamed from a file (or any iterable) through the Model's shared
engine in input order, with bounded look-ahead, into an output that a killed job resumes.

- :mod:`.driver`: the row driver every job runs on (:class:`~.driver.RowJob`,
  :func:`~.driver.run_rows`: resume, ordered writing, progress, Ctrl-C).
- :mod:`.generation_job`: :func:`run_file_job`, a text/JSONL/CSV/Parquet file in, a
  JSONL/CSV/Parquet file out (what ``parallel-gen generate`` and R's
  ``pg_generate_file`` run).
- :mod:`.classify_job`: :func:`classify_file`, the same files in and out, one row of
  label probabilities per text (what ``parallel-gen classify`` runs).
- :func:`generate_iter` (parallel_gen.generate_iter): a lazy, ordered generator of
  Completions over any iterable.
"""

from ..iterate import generate_iter
from .classify_job import ClassifyJob, classify_file, classify_job
from .driver import JobInterrupted, JobSummary, RowDone, RowJob, run_rows
from .formats import InputFormat, JobInputError, OutputFormat
from .generation_job import GenerationJob, run_file_job

__all__ = ["ClassifyJob", "GenerationJob", "InputFormat", "JobInputError", "JobInterrupted", "JobSummary",
           "OutputFormat", "RowDone", "RowJob", "classify_file", "classify_job", "generate_iter", "run_file_job",
           "run_rows"]
