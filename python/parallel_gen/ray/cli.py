"""``parallel-gen generate --ray [ADDRESS]``: the generate command's file job on Ray."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict

RAY_FLAGS_ONLY_LOCAL = ("resume", "lookahead")


def generate_on_ray(args: argparse.Namespace, sampling_params: Callable[[argparse.Namespace], Any],
                    model_kwargs: Callable[[argparse.Namespace, int], Dict[str, Any]],
                    chat_template: Callable[[argparse.Namespace], Any]) -> int:
    """Runs the job of ``args`` on Ray; returns the exit status (0, or 1 when a row failed).
    The other arguments are the generate command's own readers of its options."""
    from ..jobs.formats import JobInputError
    from . import RayJobError, run_ray_job

    if args.prompts or args.file in (None, "-") or args.output in (None, "-"):
        raise JobInputError("--ray needs --file FILE_OR_DIR and --output DIR (files every node can read), "
                            "not prompts as arguments or stdin/stdout")
    for flag in RAY_FLAGS_ONLY_LOCAL:
        if getattr(args, flag):
            raise JobInputError(f"--{flag} is not for --ray jobs: Ray retries a failed batch itself, and "
                                "--overwrite reruns a job")
    for flag, value in (("--ray-actors", args.ray_actors), ("--batch-size", args.batch_size),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise JobInputError(f"{flag} {value}: must be >= 1")
    options = model_kwargs(args, 8)
    threads = options.pop("n_threads", 1)  # each actor's threads are the CPUs Ray gives it
    if args.n_parallel is None:
        options.pop("n_parallel")
    gpus = 1 if options.get("n_gpu_layers") else 0  # --n-gpu-layers asks Ray for a GPU per actor
    try:
        summary = run_ray_job(
            args.ray or None, args.file, args.output, model=args.model, input_format=args.input_format,
            output_format=args.output_format, overwrite=args.overwrite, actors=args.ray_actors,
            cpus_per_actor=threads, gpus_per_actor=gpus, batch_size=args.batch_size, progress=bool(args.progress),
            prompt_column=args.prompt_column, messages_column=args.messages_column, chat=args.chat,
            system=args.system, chat_template=chat_template(args), params=sampling_params(args),
            model_options=options)
    except RayJobError as e:
        print(f"parallel-gen generate: error: {e}", file=sys.stderr)
        return 1
    if args.stats:
        print(f"{summary.rows} rows ({summary.failed} failed) in {summary.seconds:.2f} s on Ray, written to "
              f"{os.fspath(summary.output)}", file=sys.stderr)
    if summary.failed:
        print(f"parallel-gen generate: {summary.failed} of {summary.rows} row(s) failed (see their \"error\")",
              file=sys.stderr)
        return 1
    return 0
