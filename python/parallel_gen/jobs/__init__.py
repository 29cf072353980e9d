"""Batch jobs: prompts streamed from a file (or any iterable) through the Model's shared
engine in input order, with bounded look-ahead, into an output that a killed job resumes.

- :func:`generate_iter` (parallel_gen.generate_iter): a lazy, ordered generator of
  Completions over any iterable, on which the file jobs run.
- :func:`run_file_job`: a text/JSONL/CSV/Parquet file in, a JSONL/CSV/Parquet file out
  (what ``parallel-gen generate`` and R's ``pg_generate_file`` run).
- :func:`classify_file`: the same files in and out, one row of label probabilities per
  text (what ``parallel-gen classify`` runs).
"""

from .classify import classify_file
from .formats import InputFormat, JobInputError, OutputFormat
from .job import JobInterrupted, JobSummary, run_file_job
from ..iterate import generate_iter

__all__ = ["InputFormat", "JobInputError", "JobInterrupted", "JobSummary", "OutputFormat", "classify_file",
           "generate_iter", "run_file_job"]
