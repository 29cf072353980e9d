"""The engine thread's Python between two decodes with many streaming requests: what the
runner does after ``engine.step()`` returns (counters, events to every request, waking the
event loop), measured per step with N concurrent one-prompt streams on one asyncio loop (as
N server clients are), old build against new, side by side:

    pip install --no-deps --target /tmp/pg-old <an older checkout>
    python benchmarks/dispatch.py --streams 256 --rounds 2 --baseline-site /tmp/pg-old \
        --json benchmarks/results-dispatch.json

Each run is a fresh process. It times every runner step and the native ``engine.step()``
inside it (by wrapping the runner's engine: measurement only); the difference is the
Python the engine thread runs per step while a GPU would wait. On this CPU a decode step
at 256 rows takes ~0.8 s, so the figure is a cost per step, not a throughput change here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

CHILD = r'''
import asyncio, json, statistics, sys, time
import parallel_gen as pg
from parallel_gen.model_files import default_model_path

N, TOKENS = int(sys.argv[1]), int(sys.argv[2])


class Timed:
    """The runner's engine, with each step() timed."""

    def __init__(self, engine):
        self.engine, self.native = engine, []

    def step(self):
        t = time.perf_counter()
        out = self.engine.step()
        self.native.append(time.perf_counter() - t)
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


m = pg.Model(default_model_path(), n_parallel=N, n_ctx=64, n_threads=2, prompt_cache=False)
pg.generate_parallel(m, ["warm up"], max_tokens=2)
runner = m._require_runner()
timed = Timed(runner._engine)
runner._engine = timed
step, totals = runner._step, []


def timed_step():
    t = time.perf_counter()
    step()
    totals.append(time.perf_counter() - t)


runner._step = timed_step


async def one(i):
    async for _ in pg.astream_parallel(m, [f"Item {i}: the"], max_tokens=TOKENS, temperature=0, ignore_eos=True):
        pass


async def main():
    await asyncio.gather(*(one(i) for i in range(N)))


asyncio.run(main())
python = [t - n for t, n in zip(totals, timed.native)][2:-2]  # the steps with every stream running
print(json.dumps({"steps": len(totals), "python_ms_median": 1000 * statistics.median(python),
                  "python_ms_max": 1000 * max(python), "native_ms_median": 1000 * statistics.median(timed.native)}))
m.close()
'''


def run(site: Optional[str], streams: int, tokens: int) -> Dict[str, float]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(streams), str(tokens)], env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=256, help="concurrent one-prompt streams (and n_parallel)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline-site", help="folder with the baseline build of parallel_gen")
    ap.add_argument("--json", help="write the runs here")
    args = ap.parse_args()
    builds = [("new", None)] if not args.baseline_site else [("baseline", args.baseline_site), ("new", None)]
    runs: List[Dict[str, object]] = []
    for rnd in range(1, args.rounds + 1):
        for name, site in builds:
            r = run(site, args.streams, args.tokens)
            runs.append({"build": name, "round": rnd, **r})
            print(f"round {rnd} {name:8}: python per step {r['python_ms_median']:.2f} ms (max {r['python_ms_max']:.2f}), "
                  f"decode step {r['native_ms_median']:.0f} ms", flush=True)
    for name, _ in builds:
        mine = [r for r in runs if r["build"] == name]
        print(f"{name}: python per step, median of rounds {statistics.median(r['python_ms_median'] for r in mine):.2f} ms, "
              f"worst step {max(r['python_ms_max'] for r in mine):.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
