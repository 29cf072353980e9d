"""Ray figures (issue 13), measured in one run on one machine, same prompts for each:

1. generate_parallel: 1 process x THREADS threads, the prompts in one call;
2. Ray, 1 actor x THREADS threads;
3. Ray, THREADS actors x 1 thread;
4. Ray's overhead per batch: the same dataset and batch size through an actor that
   returns its batch unchanged (wall time / batches, actor start excluded by a warm-up);
5. on paper: the throughput to expect from N nodes, from these figures.

The Ray runs use one local cluster started here (THREADS CPUs for the actors, one more
for the read task); each run's wall time counts its actors' start and model load, as a
job's would, and so does generate_parallel's (the Model is opened inside the timing).
Usage:

    python benchmarks/ray_bench.py --json benchmarks/results-ray.json   # the issue's 256 prompts
    python benchmarks/ray_bench.py --prompts 8 --max-tokens 2            # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import ray
import ray.data

import parallel_gen as pg
from parallel_gen.ray import generate

from jobs import SUBJECTS  # noqa: E402  (benchmarks/jobs.py: the prompts of the batch-job figures)


@dataclass
class Run:
    """One configuration over every prompt."""

    name: str
    seconds: float
    completion_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class Identity:
    """An actor that returns its batch: what Ray costs per batch without generation."""

    def __call__(self, batch: Any) -> Any:
        return batch


def prompts(n: int) -> List[Dict[str, Any]]:
    return [{"id": i, "prompt": f"Write one sentence about {SUBJECTS[i % len(SUBJECTS)]} (note {i}):"}
            for i in range(n)]


def local(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> Run:
    t0 = time.perf_counter()
    with pg.Model(args.model, n_parallel=args.n_parallel, n_ctx=args.n_ctx, n_threads=args.threads) as m:
        result = pg.generate_parallel(m, [r["prompt"] for r in rows], max_tokens=args.max_tokens, temperature=0,
                                      ignore_eos=True)
    return Run(f"generate_parallel 1 x {args.threads} threads", time.perf_counter() - t0,
               sum(c.completion_tokens for c in result))


def on_ray(args: argparse.Namespace, rows: List[Dict[str, Any]], actors: int, threads: int) -> Run:
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    t0 = time.perf_counter()
    out = generate(ds, args.model, actors=actors, cpus_per_actor=threads, batch_size=args.batch_size,
                   max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                   model_options={"n_parallel": args.n_parallel, "n_ctx": args.n_ctx}).take_all()
    seconds = time.perf_counter() - t0
    assert len(out) == len(rows) and all(r["error"] is None for r in out), "a row failed"
    return Run(f"Ray {actors} actor(s) x {threads} thread(s)", seconds, sum(r["completion_tokens"] for r in out))


def overhead_per_batch(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> float:
    """Seconds per batch of an identity actor pool over the same batches, after a warm-up."""
    batches = max(1, -(-len(rows) // args.batch_size))

    def once() -> float:
        ds = ray.data.from_items(rows, override_num_blocks=batches)
        t0 = time.perf_counter()
        ds.map_batches(Identity, batch_size=args.batch_size, batch_format="pyarrow",
                       compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
        return time.perf_counter() - t0

    once()  # worker processes and the actor class are ready after this
    return once() / batches


def projection(best: Run, n_rows: int, batch_size: int) -> List[Dict[str, float]]:
    """Tokens/s to expect from N nodes like this one: each node runs the best Ray
    configuration on its share of the rows; the driver hands out batches, and the
    per-batch overhead, paid once per batch on some node, is already inside ``best``.
    Linear in N while every node gets enough batches to stay busy (rows / batch_size
    >= a few times the actors of all nodes) and the input and output stores keep up."""
    out = []
    for n in (1, 2, 4, 8, 16):
        enough = n_rows / batch_size >= 4 * n
        out.append({"nodes": n, "tokens_per_second": round(best.tokens_per_second * n, 1),
                    "batches_per_node": round(n_rows / batch_size / n, 1), "enough_batches": enough})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="threads of generate_parallel; CPUs of the Ray runs")
    p.add_argument("--n-parallel", type=int, default=8, help="slots of every Model (each actor's too)")
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="rows per Ray batch")
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: the packaged default model)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.model = args.model or str(pg.default_model_path())
    rows = prompts(args.prompts)

    runs = [local(args, rows)]
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        runs.append(on_ray(args, rows, 1, args.threads))
        runs.append(on_ray(args, rows, args.threads, 1))
        per_batch = overhead_per_batch(args, rows)
    finally:
        ray.shutdown()

    for r in runs:
        print(f"{r.name:32s} {r.seconds:7.2f} s  {r.completion_tokens:6d} tokens  {r.tokens_per_second:7.1f} tok/s  "
              f"({r.tokens_per_second / runs[0].tokens_per_second:.2f}x)")
    print(f"Ray overhead per batch of {args.batch_size} rows: {per_batch * 1000:.1f} ms")
    best = max(runs[1:], key=lambda r: r.tokens_per_second)
    plan = projection(best, args.prompts, args.batch_size)
    print(f"N nodes like this one, each running '{best.name}' on its share of {args.prompts} rows:")
    for row in plan:
        note = "" if row["enough_batches"] else "  (too few batches per node: more rows, or a smaller --batch-size)"
        print(f"  {row['nodes']:3d} nodes: {row['tokens_per_second']:9.1f} tok/s{note}")
    if args.json:
        figures = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "runs": [dict(asdict(r), tokens_per_second=r.tokens_per_second) for r in runs],
                   "ray_overhead_per_batch_s": per_batch, "projection": plan, "cpus": os.cpu_count()}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
