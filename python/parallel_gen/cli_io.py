"""Input and output helpers of ``parallel-gen generate`` (the job itself is jobs/)."""

from __future__ import annotations

import shlex
from typing import IO, List, Sequence

from .jobs.formats import InputFormat, JobInputError
from .jobs.driver import JobSummary
from .jobs.sources import Columns, InputRow, Source

InputError = JobInputError
"""Prompts or files that cannot be used: the message names the source and what to do."""


def argument_source(prompts: Sequence[str], columns: Columns) -> Source:
    """Prompts given as command-line arguments, as a job's input rows."""
    rows = (InputRow(i, f"argument {i + 1}", {columns.prompt: p}, prompt=p) for i, p in enumerate(prompts))
    return Source("<arguments>", InputFormat.TEXT, iter(rows), len(prompts))


def resume_command(argv: List[str]) -> str:
    """The command line that continues an interrupted job: the same one with --resume."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["parallel-gen", *args])


def print_summary(s: JobSummary, out: IO[str]) -> None:
    """The --stats line of a job."""
    resumed = f", {s.skipped} already done" if s.skipped else ""
    if s.completion_tokens:
        work = (f"{s.prompt_tokens} prompt + {s.completion_tokens} generated tokens in {s.seconds:.2f} s: "
                f"{s.tokens_per_second:.0f} generated tok/s")
    else:  # nothing generated (classify): rows per second
        work = f"{s.prompt_tokens} prompt tokens in {s.seconds:.2f} s: {s.rows_per_second:.1f} rows/s"
    print(f"{s.rows} rows ({s.written} written{resumed}, {s.failed} failed), {work}; n_ctx {s.n_ctx}", file=out)
