"""Throughput of many concurrent callers against one call with all their prompts.

8 threads each submit 4 prompts to one shared Model (their sequences join one running
batch) versus one generate_parallel call with all 32 prompts, alternating in one process.
The figure is the ratio of aggregate generated tokens per second of wall time.

    PYTHONPATH=python python3 benchmarks/concurrency.py --threads 8 --per-thread 4 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import parallel_gen as pg
from parallel_gen.models import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--threads", type=int, default=8, help="concurrent callers")
    ap.add_argument("--per-thread", type=int, default=4, help="prompts per caller")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-parallel", type=int, default=32)
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    n = args.threads * args.per_thread
    prompts = [f"Question {i}: describe the number {i} in a few words." for i in range(n)]
    kw = dict(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    with pg.Model(args.model or default_model_path(), n_parallel=args.n_parallel, n_ctx=256,
                  n_threads=args.cpu_threads) as model:
        pg.generate_parallel(model, prompts[:2], max_tokens=4)  # warm up

        def one_call() -> float:
            t0 = time.perf_counter()
            r = pg.generate_parallel(model, prompts, **kw)
            return r.stats.completion_tokens / (time.perf_counter() - t0)

        def many_callers() -> float:
            tokens = [0] * args.threads

            def caller(k: int) -> None:
                mine = prompts[k * args.per_thread:(k + 1) * args.per_thread]
                tokens[k] = pg.generate_parallel(model, mine, **kw).stats.completion_tokens

            threads = [threading.Thread(target=caller, args=(k,)) for k in range(args.threads)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(tokens) / (time.perf_counter() - t0)

        ratios, singles, multis = [], [], []
        for r in range(args.rounds):
            s, m = one_call(), many_callers()
            singles.append(s)
            multis.append(m)
            ratios.append(m / s)
            print(f"round {r + 1}: one call {s:.1f} t/s, {args.threads} threads x {args.per_thread} prompts "
                  f"{m:.1f} t/s, ratio {m / s:.3f}", flush=True)
    print(f"median ratio (threads / one call): {statistics.median(ratios):.3f} "
          f"(one call {statistics.median(singles):.1f} t/s, threads {statistics.median(multis):.1f} t/s)")


if __name__ == "__main__":
    main()
