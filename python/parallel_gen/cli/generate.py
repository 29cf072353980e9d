"""``parallel-gen generate``: completions for every prompt of a file (of any size), its
arguments or stdin, streamed into a resumable output (the job: jobs/generation_job.py)."""

from __future__ import annotations

import argparse

from .options import (add_chat_options, add_job_input_options, add_job_output_options, add_model_options,
                      add_sampling_options, chat_template_arg, sampling_params)


HELP = "generate completions for many prompts (a file of any size)"
DESCRIPTION = ("Generate a completion for every prompt, decoded together in one batch, streamed: rows are read "
               "lazily and each output row is written (in input order) as soon as it is done, so a killed job "
               "resumes with --resume. Prompts come from the arguments, --file / '-' (text, JSONL, CSV or Parquet), "
               "or stdin.")
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``generate``."""
    add_job_input_options(p, "prompts", "PROMPT", "the prompt or messages field")
    p.add_argument("--prompt-column", metavar="NAME", default="prompt",
                   help="the input field holding the prompt (default: prompt)")
    p.add_argument("--messages-column", metavar="NAME", default="messages",
                   help="the input field holding a conversation, a list of {role, content} (default: messages)")
    add_chat_options(p, "send each plain prompt as a user message through the model's chat template")
    add_job_output_options(p, ["auto", "jsonl", "csv", "parquet", "text"],
                           "output rows: the input's fields + row, text, finish_reason, stop_reason, "
                           "prompt_tokens, completion_tokens, error (jsonl, csv, parquet), or the texts alone "
                           "(text) (default: by the extension of --output, else jsonl)")
    add_sampling_options(p)
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    """The ``generate`` command; returns its exit status."""
    from ..jobs.generation_job import run_source_job
    from ..jobs.sources import Columns
    from .jobs import job_source, run_job

    if args.ray is not None:
        from ..ray.cli import generate_on_ray

        return generate_on_ray(args)
    params = sampling_params(args)
    template_arg = chat_template_arg(args)
    source = job_source(args, Columns(args.prompt_column, args.messages_column))
    return run_job(args, source, lambda model_options: run_source_job(
        args.model, source, args.output, output_format=args.output_format, resume=args.resume,
        overwrite=args.overwrite, chat=args.chat, system=args.system, chat_template=template_arg,
        progress=args.progress, params=params, lookahead=args.lookahead, model_options=model_options))
