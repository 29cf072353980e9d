"""``parallel-gen``'s parser and entry point: one module per command (generate.py,
classify.py, demo.py, info.py: each its HELP, DESCRIPTION, EPILOG, ``add_arguments`` and
``run``; ``serve`` in server/cli.py, ``bench`` in bench/), their shared options and exit
statuses in options.py. Building the parser (``--help``) loads
no llama.cpp: each command imports what it runs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, List, Optional

from . import agreement, classify, compare, demo, generate, info, install_model
from .options import EXIT_STATUS_HELP, ExitStatus


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``parallel-gen`` with all its subcommands."""
    from ..bench.arguments import add_parser as add_bench
    from ..server.cli import add_parser as add_serve  # imports no server package until `serve` runs

    p = argparse.ArgumentParser(prog="parallel-gen", description="Batched text generation with llama.cpp",
                                epilog=EXIT_STATUS_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in (("generate", generate), ("classify", classify), ("compare", compare),
                          ("agreement", agreement), ("demo", demo),
                          ("install-model", install_model), ("info", info)):
        c = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION, epilog=command.EPILOG)
        command.add_arguments(c)
        c.set_defaults(func=command.run)
    add_bench(sub)
    add_serve(sub)
    return p


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is at the time of each record, so a
    swapped stderr (pytest capture, a redirecting caller) is honoured, never a stale one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """Shows parallel_gen's warnings (and info with --verbose) on stderr, once per process."""
    log = logging.getLogger("parallel_gen")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("parallel-gen: %(levelname)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line; returns the exit status (see options.ExitStatus)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print the command that resumes a job
    setup_logging(bool(getattr(args, "verbose", False)))
    from ..errors import GenerationError, ModelLoadError

    def fail(code: ExitStatus, message: str) -> int:
        print(f"parallel-gen {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args))
    except (FileNotFoundError, ModelLoadError) as e:  # a missing model says how to get it
        return fail(ExitStatus.FAILED, info.os_error_text(e))
    except GenerationError as e:
        return fail(ExitStatus.FAILED, str(e))
    except ImportError as e:  # --progress without tqdm
        return fail(ExitStatus.FAILED, str(e))
    except (ValueError, TypeError) as e:  # bad option values or input (JobInputError included)
        return fail(ExitStatus.USAGE, str(e))
    except KeyboardInterrupt:
        return fail(ExitStatus.INTERRUPTED, "interrupted")
    except BrokenPipeError:  # `parallel-gen generate ... | head`: the reader left, not an error
        # Point stdout at /dev/null so the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
