"""``parallel-gen bench``: generate_parallel against the llama-cpp-python loop and llama.cpp.

- :mod:`.workloads`: the prompt sets (short, prefix, mixed, ragged, grammar, concurrent)
  and their variants;
- :mod:`.impls`: the implementations timed, behind one interface returning a
  :class:`~.records.Measurement` (loop, generate_parallel, concurrent callers,
  llama-batched-bench) and where llama-batched-bench is found;
- :mod:`.report`: medians (numpy), per-round ratios, targets, table, JSON and plot;
- :mod:`.cli`: the command line and the driver.

See benchmarks/README.md for what every figure means.
"""

from .cli import add_parser, main
from .impls import BATCHED_BENCH_ENV, BatchedBenchNotFound, find_batched_bench
from .records import SCHEMA

__all__ = ["BATCHED_BENCH_ENV", "SCHEMA", "BatchedBenchNotFound", "add_parser", "find_batched_bench", "main"]
