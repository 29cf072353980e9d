"""``parallel-gen bench``'s arguments: what ``parallel-gen --help`` needs of the bench,
without importing it (the bench itself, cli.py, runs only when ``bench`` does)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..cli.options import ExitStatus, add_model_flag, model_flag
from .workloads import AGAINST_LLAMA_CPP, WORKLOADS

DEFAULT_N_PARALLEL = (1, 2, 4, 8, 16, 32)

DESCRIPTION = ("Benchmark generate_parallel against the llama-cpp-python loop (Llama.create_completion per "
               "prompt) and llama.cpp's llama-batched-bench, in one process, alternating rounds; and the "
               "engine's own workloads (ragged endings, a grammar, concurrent callers).")


def _n_parallel_list(text: str) -> List[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"n_parallel values must be >= 1, got {text!r}")
    return values


def _workload_list(text: str) -> List[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    if names == ["all"]:
        return list(WORKLOADS)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(WORKLOADS)} or all")
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: parallel_gen.model_files.default_model_path())")
    p.add_argument("--prompts", type=_positive, default=16, metavar="N", help="prompts per workload (default 16)")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--n-parallel", type=_n_parallel_list, default=list(DEFAULT_N_PARALLEL), metavar="LIST",
                   help="comma-separated n_parallel values (default 1,2,4,8,16,32); values above the "
                        "number of sequences are skipped")
    p.add_argument("--workload", type=_workload_list, default=list(AGAINST_LLAMA_CPP), metavar="LIST",
                   help="comma-separated workloads, or all: short (independent short prompts), prefix (prompts "
                        "sharing a ~300-token prefix, plus its no-reuse control), mixed (mixed prompt lengths), "
                        "ragged (outputs ending at different times), grammar (JSON schema against free), "
                        "concurrent (threads sharing one Model against one call). Default: short,prefix,mixed")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off",
                   help="flash attention everywhere (default off, llama-cpp-python's Llama default)")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers offloaded to the GPU everywhere (the Llama, hence the Models that share its "
                        "weights, and batched-bench's -ngl); -1: all. Needs a GPU build of llama-cpp-python "
                        "(default 0)")
    add_model_flag(p, model_flag("repack"))
    add_model_flag(p, model_flag("prompt_cache"), "the prompt cache of generate_parallel's Models (default: on)")
    p.add_argument("--repeat", type=_positive, default=3, metavar="R",
                   help="alternating rounds; medians are reported (default 3)")
    p.add_argument("--batched-bench", metavar="PATH",
                   help="llama-batched-bench executable (default: $PARALLEL_GEN_BATCHED_BENCH, else on PATH, "
                        "else the source tree's benchmarks/bin/)")
    p.add_argument("--no-batched-bench", action="store_true", help="do not run llama-batched-bench")
    p.add_argument("--no-loop", action="store_true", help="do not run the llama-cpp-python loop")
    p.add_argument("--prefix-tokens", type=_positive, default=300, help="shared prefix length (default 300)")
    p.add_argument("--callers", type=_positive, default=8, metavar="K",
                   help="threads of the concurrent workload, the prompts split among them (default 8)")
    p.add_argument("--samples", type=_positive, default=1, metavar="K",
                   help="completions per prompt (SamplingParams.n; the loop runs each prompt K times)")
    p.add_argument("--json", metavar="FILE", help="write every measurement, medians and ratios as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of throughput against n_parallel (needs matplotlib)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers the ``bench`` subcommand on the parallel-gen command line."""
    p = subparsers.add_parser("bench", help="benchmark generate_parallel against the llama-cpp-python loop",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command (the driver is imported now: it loads llama.cpp)."""
    from .cli import run as run_bench

    return run_bench(args)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m parallel_gen.bench``: the same command outside parallel-gen."""
    p = argparse.ArgumentParser(prog="parallel-gen bench", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except FileNotFoundError as e:  # the model, or llama-batched-bench
        print(f"parallel-gen bench: {e}", file=sys.stderr)
        return ExitStatus.USAGE

