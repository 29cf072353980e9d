"""``parallel-gen compare``: several models x templates classify the texts of a file;
the codings as one long table, and their agreement with gold and with each other (the
job: study/compare_file.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

from .options import (ExitStatus, add_chat_options, add_model_options, add_progress_option, chat_template_arg,
                      model_options, read_arg_file)

HELP = "classify a file's texts with several models x templates and compare them (with gold labels)"
DESCRIPTION = ("Each coder (a model crossed with a template) classifies every text as `parallel-gen classify` does, "
               "one model at a time, into its own part (OUTPUT.parts/), streamed and resumable; the parts are then "
               "joined into the long table OUTPUT (item, coder, model, template, text, gold, label, p_LABEL..., "
               "error) and the agreement is printed (with --gold-column: against gold too).")
EPILOG = ("a killed compare continues with the same command and --resume: finished coders are skipped, a cut one "
          "resumes after its last row. OUTPUT.run.json records the software, machine, model hashes, arguments "
          "and input hash.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``compare``."""
    p.add_argument("-f", "--file", metavar="FILE", required=True, help="the texts (text, JSONL, CSV or Parquet)")
    p.add_argument("--input-format", choices=["auto", "text", "jsonl", "csv", "parquet"], default="auto",
                   help="format of --file (default: by extension)")
    p.add_argument("--text-column", metavar="NAME", default="text", help="the field holding the text (default: text)")
    p.add_argument("--gold-column", metavar="NAME", help="the field holding each text's true label")
    lab = p.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", metavar="A,B,...", help="the labels, comma separated")
    lab.add_argument("--labels-file", metavar="FILE", help="the labels, one per line")
    p.add_argument("--models", nargs="+", metavar="[NAME=]GGUF", required=True,
                   help="the models (GGUF files), each optionally named: smol=SmolLM2.gguf (default name: the file's)")
    p.add_argument("--template", action="append", default=[], metavar="NAME=TEXT",
                   help="a prompt variant ({text}, {labels}) (repeatable; default: classify's own)")
    p.add_argument("--template-file", action="append", default=[], metavar="NAME=FILE",
                   help="a prompt variant read from FILE (repeatable)")
    add_chat_options(p, "score each label as the assistant's answer (see classify)", "system message (implies --chat)")
    p.add_argument("--normalize", choices=["sum", "mean"], default="sum", help="as for classify (default: sum)")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the long table (.csv, .jsonl, or .parquet with pyarrow)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--resume", action="store_true", help="continue the compare that wrote --output")
    w.add_argument("--overwrite", action="store_true", help="replace an existing --output and its parts")
    add_agreement_output_options(p)
    p.add_argument("--lookahead", type=int, metavar="N", help="most rows in flight per coder (default: 4 per slot)")
    add_progress_option(p)
    add_model_options(p)


def add_agreement_output_options(p: argparse.ArgumentParser) -> None:
    """--level, --ci, --seed, --n-boot, --report, --plot (compare and agreement)."""
    g = p.add_argument_group("agreement")
    g.add_argument("--level", choices=["nominal", "ordinal", "interval"], default="nominal",
                   help="Krippendorff's alpha's metric (ordinal and interval: the labels in their order)")
    g.add_argument("--ci", type=float, default=0.95, help="bootstrap interval coverage, 0 for none (default: 0.95)")
    g.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default: 0)")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default: 1000)")
    g.add_argument("--report", metavar="FILE", help="write the agreement as JSON to FILE")
    g.add_argument("--plot", metavar="FILE", help="draw confusion matrices and the kappa matrix to FILE (PNG, PDF...)")


def templates_arg(args: argparse.Namespace) -> Optional[Dict[str, str]]:
    """name -> template of --template NAME=TEXT and --template-file NAME=FILE (None: none given)."""
    from ..jobs.formats import JobInputError

    out: Dict[str, str] = {}
    for flag, items in (("--template", args.template), ("--template-file", args.template_file)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise JobInputError(f"{flag} {item!r}: expected NAME={'TEXT' if flag == '--template' else 'FILE'}")
            if name in out:
                raise JobInputError(f"{flag} {item!r}: a template named {name!r} is given twice")
            out[name] = value if flag == "--template" else read_arg_file(flag, value)
    return out or None


def write_agreement(args: argparse.Namespace, agreement: object) -> None:
    """Prints the report; writes --report and --plot."""
    import json

    print(agreement.report())  # type: ignore[attr-defined]
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(agreement.to_dict(), f, indent=1)  # type: ignore[attr-defined]
            f.write("\n")
    if args.plot:
        agreement.plot(args.plot)  # type: ignore[attr-defined]


def models_arg(models: List[str]) -> Tuple[List[str], List[str]]:
    """(names, paths) of --models [NAME=]PATH ...: a name has no path separator; the default is the file's name."""
    from ..study.compare import model_name

    names, paths = [], []
    for m in models:
        name, sep, path = m.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            name, path = model_name(m), m
        names.append(name)
        paths.append(path)
    return names, paths


def ci_arg(args: argparse.Namespace) -> Optional[float]:
    return None if args.ci == 0 else args.ci


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command; returns its exit status."""
    from ..jobs.driver import JobInterrupted
    from ..study.agreement import agreement
    from ..study.compare_file import compare_file, read_codings
    from .classify import labels_arg
    from .jobs import resume_command

    _, _, labels = labels_arg(args)
    options = model_options(args, None)
    names, paths = models_arg(args.models)
    try:
        summary = compare_file(paths, args.file, args.output, labels, templates=templates_arg(args),
                               text_column=args.text_column, gold_column=args.gold_column,
                               input_format=args.input_format, chat=args.chat, system=args.system,
                               normalize=args.normalize, chat_template=chat_template_arg(args), resume=args.resume,
                               overwrite=args.overwrite, progress=args.progress, lookahead=args.lookahead,
                               model_options=options, model_names=names)
    except JobInterrupted:
        print("parallel-gen compare: interrupted; the coders' parts written are kept", file=sys.stderr)
        print(f"continue with: {resume_command(args.argv)}", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    rows: List[dict] = read_codings(args.output)
    if summary.gold is not None or len(summary.coders) >= 2:
        write_agreement(args, agreement(rows, gold="gold" if summary.gold is not None else None, labels=labels,
                                        level=args.level, ci=ci_arg(args), seed=args.seed, n_boot=args.n_boot))
    if summary.failed:
        print(f"parallel-gen compare: {summary.failed} of {summary.rows} coding(s) failed (see their \"error\")",
              file=sys.stderr)
        return ExitStatus.FAILED
    return ExitStatus.OK
