"""Command line: ``parallel-gen <command>`` (also ``python -m parallel_gen``).

Commands: ``generate`` (prompts from arguments, a file of any size or stdin; JSONL, CSV,
Parquet or text out; resumable, see jobs/), ``classify`` (label probabilities of many
texts, the same inputs and outputs), ``demo`` (a few chat questions on the default
model), ``info`` (model and build), ``bench`` and ``serve``. The options they share and
the exit statuses are in :mod:`.options`: 0 success; 1 model missing or unloadable,
generation failed, or some prompt finished with an error; 2 bad arguments or input;
130 interrupted.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
