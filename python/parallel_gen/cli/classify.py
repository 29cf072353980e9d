"""``parallel-gen classify``: label probabilities for every text of a file (of any size),
its arguments or stdin, streamed into a resumable output (the job: jobs/classify_job.py)."""

from __future__ import annotations

import argparse
from typing import List, Tuple

from .options import (add_chat_options, add_job_input_options, add_job_output_options, add_model_options,
                      chat_template_arg, read_arg_file)


HELP = "label probabilities for many texts (a file of any size)"
DESCRIPTION = ("Classify every text over the labels with exact probabilities (no sampling; see "
               "parallel_gen.classify): each label is scored as the continuation of the text's prompt. Streamed and "
               "resumable like generate: texts come from the arguments, --file / '-' (text, JSONL, CSV or Parquet) "
               "or stdin, and each output row is written in input order as soon as it is done.")
EPILOG = ("output row: the input's fields, then row, label (the most likely), p_LABEL for each label in the "
          "order given (the probabilities, summing to 1) and error; an input field named like one of these is "
          "kept as input_NAME. A text that cannot be classified (say, too long for --n-ctx) gets error set and "
          "null label and probabilities, and the exit status is 1.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``classify``."""
    add_job_input_options(p, "texts", "TEXT", "the --text-column field")
    p.add_argument("--text-column", metavar="NAME", default="text",
                   help="the input field holding the text (default: text)")
    lab = p.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", metavar="A,B,...",
                     help="the labels, comma separated (spaces around each are dropped)")
    lab.add_argument("--labels-file", metavar="FILE", help="the labels, one per line (for labels with commas)")
    tpl = p.add_mutually_exclusive_group()
    tpl.add_argument("--template", metavar="T",
                     help="the prompt: {text} is the text, {labels} the labels joined by ', ' (default: one that "
                          "names the labels and ends with 'Label: '; with --chat, the user's message)")
    tpl.add_argument("--template-file", metavar="FILE", help="read --template from FILE")
    add_chat_options(p, "put the prompt in a user turn through the model's chat template and score each label "
                        "as the assistant's whole answer", "system message (implies --chat)")
    p.add_argument("--normalize", choices=["sum", "mean"], default="sum",
                   help="softmax over the labels' total log-likelihoods (sum) or per-token means (mean) "
                        "(default: sum)")
    add_job_output_options(p, ["auto", "jsonl", "csv", "parquet"],
                           "output rows (default: by the extension of --output, else jsonl)")
    add_model_options(p)


def labels_arg(args: argparse.Namespace) -> Tuple[str, str, List[str]]:
    """(flag, value, labels) of --labels A,B,C (spaces around each trimmed) or --labels-file
    (one label per line, blank lines skipped)."""
    if args.labels_file is not None:
        lines = read_arg_file("--labels-file", args.labels_file).splitlines()
        return "--labels-file", args.labels_file, [line for line in lines if line != ""]
    return "--labels", args.labels, [lab.strip() for lab in args.labels.split(",")]


def run(args: argparse.Namespace) -> int:
    """The ``classify`` command; returns its exit status."""
    from ..classification import classify_options
    from ..jobs.classify_job import classify_job, text_columns
    from ..jobs.driver import run_rows
    from ..jobs.formats import JobInputError
    from .jobs import job_source, run_job

    flag, value, labels = labels_arg(args)
    try:
        classify_options(labels)
    except (TypeError, ValueError) as e:
        raise JobInputError(f"{flag} {value!r}: {e}") from None
    template = args.template
    if args.template_file is not None:
        template = read_arg_file("--template-file", args.template_file)
    options = dict(template=template, chat=args.chat, system=args.system, normalize=args.normalize,
                   chat_template=chat_template_arg(args))
    try:
        job = classify_job(labels, **options)
    except (TypeError, ValueError) as e:  # the labels are fine: the template is not
        which = "--template-file" if args.template_file is not None else "--template"
        raise JobInputError(f"{which}: {e}") from None
    if args.ray is not None:
        from ..ray.cli import classify_on_ray

        return classify_on_ray(args, labels, options)
    source = job_source(args, text_columns(args.text_column), "texts")
    return run_job(args, source, lambda model_options: run_rows(
        args.model, source, args.output, job, output_format=args.output_format, resume=args.resume,
        overwrite=args.overwrite, progress=args.progress, lookahead=args.lookahead, model_options=model_options))
