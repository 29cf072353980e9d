"""``parallel-gen agreement``: agreement statistics of any codings table (ours, or human
coders' from a CSV): per coder against gold, between coders, Krippendorff's alpha."""

from __future__ import annotations

import argparse

from .compare import add_agreement_output_options, ci_arg, write_agreement
from .options import ExitStatus

HELP = "agreement of coders with gold labels and each other (accuracy, F1, kappa, alpha)"
DESCRIPTION = ("Read a long codings table (CSV, or JSONL by extension: one row per item and coder) and print per coder "
               "against gold (with --gold-column) accuracy, per-class precision/recall/F1, macro and weighted F1, "
               "Cohen's kappa and the confusion matrix; per pair of coders percent agreement and Cohen's kappa; "
               "Krippendorff's alpha over all coders; with seeded percentile bootstrap intervals.")
EPILOG = "an empty label cell is a missing label: counted per coder, left out as Krippendorff's alpha leaves it out."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``agreement``."""
    p.add_argument("codings", metavar="CODINGS", help="the codings table (.csv, .jsonl, or .parquet with pyarrow)")
    p.add_argument("--item-column", default="item", metavar="NAME", help="the item's id (default: item)")
    p.add_argument("--coder-column", default="coder", metavar="NAME", help="the coder's name (default: coder)")
    p.add_argument("--label-column", default="label", metavar="NAME", help="the coder's label (default: label)")
    p.add_argument("--gold-column", metavar="NAME", help="the item's true label")
    p.add_argument("--labels", metavar="A,B,...", help="the labels in their order (default: as they appear)")
    add_agreement_output_options(p)


def run(args: argparse.Namespace) -> int:
    """The ``agreement`` command; returns its exit status."""
    from ..study.agreement import agreement
    from ..study.compare_file import read_codings

    rows = read_codings(args.codings)
    labels = None if args.labels is None else [lab.strip() for lab in args.labels.split(",")]
    write_agreement(args, agreement(rows, gold=args.gold_column, labels=labels, level=args.level, ci=ci_arg(args),
                                    seed=args.seed, n_boot=args.n_boot, item=args.item_column,
                                    coder=args.coder_column, label=args.label_column))
    return ExitStatus.OK
