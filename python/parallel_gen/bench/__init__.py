"""``parallel-gen bench``: generate_parallel against the llama-cpp-python loop and llama.cpp.

- :mod:`.workloads`: the prompt sets (short, prefix, mixed, ragged, grammar, concurrent)
  and their variants;
- :mod:`.impls`: the implementations timed, behind one interface returning a
  :class:`~.records.Measurement` (loop, generate_parallel, concurrent callers,
  llama-batched-bench) and where llama-batched-bench is found;
- :mod:`.report`: medians (numpy), per-round ratios, targets, table, JSON and plot;
- :mod:`.arguments`: the command line's arguments (light: ``parallel-gen --help``
  builds them without importing the rest);
- :mod:`.cli`: the driver.

See benchmarks/README.md for what every figure means.
"""

import importlib
from typing import Any

from .arguments import add_parser, main
from .records import SCHEMA

_LAZY = {"BATCHED_BENCH_ENV": "impls", "BatchedBenchNotFound": "impls",
         "find_batched_bench": "impls"}


def __getattr__(name: str) -> Any:  # the driver is imported when first used: it loads llama.cpp
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["BATCHED_BENCH_ENV", "SCHEMA", "BatchedBenchNotFound", "add_parser", "find_batched_bench", "main"]
