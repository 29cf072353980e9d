"""``parallel-gen generate --ray [ADDRESS]`` and ``parallel-gen classify --ray``: the file
jobs of those commands on Ray, read from the commands' own options (cli/options.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Sequence

from ..cli.options import ExitStatus, chat_template_arg, model_options, sampling_params

RAY_FLAGS_ONLY_LOCAL = ("resume", "lookahead")


def generate_on_ray(args: argparse.Namespace, tools: Dict[str, Any]) -> int:
    """Runs the generate job of ``args`` on Ray (``tools``: run_ray_job's tools keywords,
    checked); returns the exit status (FAILED when a row failed)."""
    from . import run_ray_job

    return _on_ray(args, lambda **pool: run_ray_job(
        prompt_column=args.prompt_column, messages_column=args.messages_column, chat=args.chat, system=args.system,
        chat_template=chat_template_arg(args), params=sampling_params(args), cache=args.result_cache, **tools,
        **pool))


def classify_on_ray(args: argparse.Namespace, labels: Sequence[str], classify_options: Dict[str, Any]) -> int:
    """Runs the classify job of ``args`` on Ray (``classify_options``: template, chat,
    system, normalize, chat_template, as the command read them)."""
    from . import run_ray_classify_job

    return _on_ray(args, lambda **pool: run_ray_classify_job(
        labels=labels, text_column=args.text_column, **classify_options, **pool))


def _on_ray(args: argparse.Namespace, run: Callable[..., Any]) -> int:
    """The part both commands share: checks, the actor pool from the model options, how
    the job ended as messages and exit status. ``run(**pool)`` runs the job."""
    from ..jobs.formats import JobInputError
    from . import RayJobError
    from .batch import actor_resources

    command = f"parallel-gen {args.command}"
    if args.prompts or args.file in (None, "-") or args.output in (None, "-"):
        raise JobInputError("--ray needs --file FILE_OR_DIR and --output DIR (files every node can read), "
                            f"not {args.command}'s inputs as arguments or stdin/stdout")
    for flag in RAY_FLAGS_ONLY_LOCAL:
        if getattr(args, flag):
            raise JobInputError(f"--{flag} is not for --ray jobs: Ray retries a failed batch itself, and "
                                "--overwrite reruns a job")
    for flag, value in (("--ray-actors", args.ray_actors), ("--batch-size", args.batch_size),
                        ("--threads", args.n_threads)):
        if value is not None and value < 1:
            raise JobInputError(f"{flag} {value}: must be >= 1")
    options = model_options(args, None)
    threads, gpus = actor_resources(options)
    options.pop("n_threads", None)  # each actor's threads are the CPUs Ray gives it
    if args.n_parallel is None:
        options.pop("n_parallel")  # the actors' Models: ModelConfig's default
    try:
        summary = run(address=args.ray or None, input=args.file, output=args.output, model=args.model,
                      input_format=args.input_format, output_format=args.output_format, overwrite=args.overwrite,
                      actors=args.ray_actors, cpus_per_actor=threads, gpus_per_actor=gpus,
                      batch_size=args.batch_size, progress=bool(args.progress), model_options=options)
    except RayJobError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return ExitStatus.FAILED
    if args.stats:
        print(f"{summary.rows} rows ({summary.failed} failed) in {summary.seconds:.2f} s on Ray, written to "
              f"{os.fspath(summary.output)}", file=sys.stderr)
    if summary.failed:
        print(f"{command}: {summary.failed} of {summary.rows} row(s) failed (see their \"error\")", file=sys.stderr)
        return ExitStatus.FAILED
    return ExitStatus.OK
