"""What ``parallel-gen generate`` and ``classify`` share: the prompts (texts) of a job
from arguments, a file or stdin, and how a job's end becomes messages and an exit status
(the jobs themselves are jobs/)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import IO, Any, Callable, Dict, List, Sequence

from ..jobs.driver import JobInterrupted, JobSummary
from ..jobs.formats import InputFormat, JobInputError
from ..jobs.sources import Columns, InputRow, Source, open_source
from .options import ExitStatus, model_options


def job_source(args: argparse.Namespace, columns: Columns, noun: str = "prompts") -> Source:
    """Prompts (texts) from the arguments, or the --file / '-' / stdin source (opened lazily)."""
    prompts = list(args.prompts)
    path = args.file
    if prompts == ["-"]:  # '-' as the only positional: stdin, like --file -
        prompts, path = [], path or "-"
    if prompts and path is not None:
        raise JobInputError(f"give {noun} as arguments or with --file / stdin, not both")
    if prompts:
        return argument_source(prompts, columns)
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise JobInputError(f"no {noun}: give them as arguments, with --file FILE, or on stdin")
        path = "-"
    return open_source(path, args.input_format, columns)


def argument_source(prompts: Sequence[str], columns: Columns) -> Source:
    """Prompts given as command-line arguments, as a job's input rows."""
    rows = (InputRow(i, f"argument {i + 1}", {columns.prompt: p}, prompt=p) for i, p in enumerate(prompts))
    return Source("<arguments>", InputFormat.TEXT, iter(rows), len(prompts))


def run_job(args: argparse.Namespace, source: Source, run: Callable[[Dict[str, Any]], JobSummary]) -> int:
    """Runs a file job (``run(model_options)`` returns its JobSummary) and turns how it
    ended into messages and the exit status; closes ``source``."""
    from ..errors import GenerationError

    command = f"parallel-gen {args.command}"
    try:
        try:
            summary = run(model_options(args, source.total))
        except JobInterrupted as e:
            s = e.summary
            where = f"in {s.output}" if s.output else "on stdout"
            print(f"{command}: interrupted: {s.rows} rows are {where}", file=sys.stderr)
            if s.output:
                print(f"continue with: {resume_command(args.argv)}", file=sys.stderr)
            return ExitStatus.INTERRUPTED
        except GenerationError as e:  # the rows finished before the failure are in the output
            print(f"{command}: error: {e}", file=sys.stderr)
            if args.output not in (None, "-"):
                print(f"the rows written are kept; continue with: {resume_command(args.argv)}", file=sys.stderr)
            return ExitStatus.FAILED
    finally:
        source.close()
    if args.stats:
        print_summary(summary, sys.stderr)
    if summary.failed:
        print(f"{command}: {summary.failed} of {summary.written} row(s) failed "
              "(see their \"error\")", file=sys.stderr)
        return ExitStatus.FAILED
    return ExitStatus.OK


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
