"""No slowdown from a restructuring: ``parallel-gen bench --workload short,ragged`` on this
build against an older one, alternating fresh processes round by round, in one run.

    pip install --no-deps --no-build-isolation --target /tmp/pg-old <older checkout>
    ln -s "$(python -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')" /tmp/pg-old/llama_cpp
    python benchmarks/no_slowdown.py --baseline-site /tmp/pg-old --rounds 3 -o benchmarks/results-no-slowdown.json

Each round runs the baseline and this build (order alternating), 32 prompts x 64 tokens at
n_parallel 16, flash attention off, no loop, no llama-batched-bench; the figure is this
build's end-to-end tokens/s over the baseline's, per workload, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional


def run(site: Optional[str], threads: int) -> Dict[str, float]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        subprocess.run([sys.executable, "-m", "parallel_gen", "bench", "--workload", "short,ragged", "--prompts", "32",
                        "--max-tokens", "64", "--n-parallel", "16", "--threads", str(threads), "--flash-attn", "off",
                        "--no-loop", "--no-batched-bench", "--repeat", "1", "--json", out],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)["results"]
    return {f"{r['workload']}/{r['variant']}": r["median"]["e2e_tps"] for r in rows if r.get("impl", "parallel") == "parallel"}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-site", required=True, help="folder holding the older build of parallel_gen")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    rounds = []
    for rnd in range(args.rounds):
        order = [("baseline", args.baseline_site), ("new", None)]
        if rnd % 2:
            order.reverse()
        got = {name: run(site, args.threads) for name, site in order}
        rounds.append(got)
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {got['new'][k] / got['baseline'][k]:.3f}" for k in got["new"]),
              flush=True)
    ratios = {k: statistics.median(r["new"][k] / r["baseline"][k] for r in rounds) for k in rounds[0]["new"]}
    print("median new / baseline (end-to-end tokens/s): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"command": "python benchmarks/no_slowdown.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "date": time.strftime("%Y-%m-%d"), "rounds": rounds, "median_ratio": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
