"""``parallel-gen generate``: completions for every prompt of a file (of any size), its
arguments or stdin, streamed into a resumable output (the job: jobs/generation_job.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from .options import (add_chat_options, add_job_input_options, add_job_output_options, add_model_options,
                      add_sampling_options, chat_template_arg, read_arg_file, sampling_params)


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
    t = p.add_argument_group("tools (imply --chat)")
    t.add_argument("--tools", metavar="FILE",
                   help="JSON file: a list of OpenAI-style tools ({\"type\": \"function\", \"function\": {name, "
                        "description, parameters}}) offered in every conversation; rows get content and tool_calls")
    t.add_argument("--tool-choice", metavar="CHOICE", default=None,
                   help="auto (default), required, none, or a tool's name (a call of that tool)")
    t.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false",
                   help="at most one call per reply")
    add_job_output_options(p, ["auto", "jsonl", "csv", "parquet", "text"],
                           "output rows: the input's fields + row, text, finish_reason, stop_reason, "
                           "prompt_tokens, completion_tokens, error (+ content, tool_calls with --tools) "
                           "(jsonl, csv, parquet), or the texts alone (text) (default: by the extension of "
                           "--output, else jsonl)")
    add_sampling_options(p)
    p.add_argument("--result-cache", metavar="DIR_OR_URL",
                   help="answer rows whose result is a function of their inputs (greedy, or seeded with --seed "
                        "or a row's seed) from a result cache, and store them: a directory, or "
                        "redis://host:port/db (shared with servers and other jobs; with --ray, what every "
                        "node reaches)")
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    """The ``generate`` command; returns its exit status."""
    from ..jobs.generation_job import run_source_job
    from ..jobs.sources import Columns
    from .jobs import job_source, run_job

    tools = tools_args(args)
    if args.ray is not None:
        from ..ray.cli import generate_on_ray

        return generate_on_ray(args, tools)
    params = sampling_params(args)
    template_arg = chat_template_arg(args)
    source = job_source(args, Columns(args.prompt_column, args.messages_column))
    return run_job(args, source, lambda model_options: run_source_job(
        args.model, source, args.output, output_format=args.output_format, resume=args.resume,
        overwrite=args.overwrite, chat=args.chat, system=args.system, chat_template=template_arg,
        progress=args.progress, params=params, lookahead=args.lookahead, model_options=model_options,
        cache=args.result_cache, **tools))


def tools_args(args: argparse.Namespace) -> Dict[str, Any]:
    """run_source_job's tools keywords from --tools FILE, --tool-choice and
    --no-parallel-tool-calls (checked here: bad tools fail before the model loads)."""
    from ..jobs.formats import JobInputError
    from ..tools import tool_request

    if args.tools is None:
        if args.tool_choice is not None or not args.parallel_tool_calls:
            raise JobInputError("--tool-choice and --no-parallel-tool-calls need --tools FILE")
        return {}
    try:
        tools = json.loads(read_arg_file("--tools", args.tools))
    except ValueError as e:
        raise JobInputError(f"--tools {args.tools}: not valid JSON ({e})") from None
    choice: Any = args.tool_choice
    if choice is not None and choice not in ("none", "auto", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:
        tool_request(tools, choice, args.parallel_tool_calls)
    except (TypeError, ValueError) as e:
        raise JobInputError(f"--tools {args.tools}: {e}") from None
    return dict(tools=tools, tool_choice=choice, parallel_tool_calls=args.parallel_tool_calls)
