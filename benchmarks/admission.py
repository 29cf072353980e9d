"""Admission cost with the prompt cache on (issue 31, the engine's stream table; issue 27: no
per-step work that grows with the square of the slots): the build under test against an
older build, side by side in one run.

    python benchmarks/admission.py --baseline-site /tmp/pg-base -o benchmarks/results-admission.json

--baseline-site: a folder holding another parallel_gen build (``pip install --no-deps
--target DIR .`` from an older checkout), put first on the path of the baseline's runs. Each
case runs in a fresh process, the two builds alternating, so both see the same machine.

Method: a Model with n_parallel streams (SmolLM2, flash attention off) answers n prompts that
share a system prompt (1 token each): every stream then keeps a cache entry. The measured
call sends 2n new prompts with the same system prompt and 2 tokens each: every admission
chooses among n cached entries and running sequences (which stream holds the longest
prefix, what taking each stream loses, which one to overwrite), and half the admissions
happen while others run. The host tier is off (cache_ram=0): its saves of overwritten entries
would dominate the time, and are not placement. Reported: the engine's time outside llama_decode in that call
(BatchStats.host_seconds) per admitted sequence, and the call's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

from host_step import run_child  # benchmarks/ is this script's folder

CHILD = r"""
import json, sys, time
import parallel_gen as pg
from parallel_gen import model_files
n, threads = int(sys.argv[1]), int(sys.argv[2])
system = "You are a careful assistant. Answer in one short sentence, and never add anything else. "
first = [f"{system}Question {i}: what is {i} plus {i}?" for i in range(n)]
second = [f"{system}Question {i}: what is {i} times {i + 1}?" for i in range(2 * n)]
out = {"build": pg.__file__}
# cache_ram=0: no host tier, whose saves (a stream's KV copied out per overwritten entry) would
# swamp the placement work measured here
with pg.Model(model_files.smollm2_path(), n_parallel=n, n_ctx=128, n_threads=threads, flash_attn=False, cache_ram=0) as m:
    pg.generate_parallel(m, first, max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    r = pg.generate_parallel(m, second, max_tokens=2, temperature=0.0, ignore_eos=True)
    wall = time.perf_counter() - t0
s = r.stats
out.update(wall_s=wall, host_s=s.host_seconds, decode_calls=s.decode_calls, admitted=len(second),
           host_ms_per_admission=1000 * s.host_seconds / len(second), cached_prompt_tokens=s.cached_prompt_tokens,
           prefix_tokens_reused=s.prefix_tokens_reused, prompt_tokens=s.prompt_tokens, failed=s.failed,
           texts=[c.outputs[0].text for c in r][:8])
print("RESULT " + json.dumps(out))
"""


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-site", help="folder with the baseline build of parallel_gen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-parallel", default="64,255", help="comma-separated n_parallel values")
    ap.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best of each is reported")
    ap.add_argument("-o", "--output", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.n_parallel.split(",")):
        runs: Dict[str, List[Dict[str, Any]]] = {"baseline": [], "new": []}
        for _ in range(args.repeat):
            for name, site in (("baseline", args.baseline_site), ("new", None)):
                if site or name == "new":
                    runs[name].append(run_child(CHILD, [str(n), str(args.threads)], site))
        row: Dict[str, Any] = {"n_parallel": n}
        for name, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if rs:
                row[name] = min(ok, key=lambda r: r["host_s"]) if ok else rs[0]
        b, nw = row.get("baseline", {}), row["new"]
        if "host_s" in b and "host_s" in nw:
            row["host_speedup"] = b["host_s"] / nw["host_s"]
            row["wall_ratio"] = b["wall_s"] / nw["wall_s"]
            row["same_texts"] = b["texts"] == nw["texts"]
        rows.append(row)
        print(f"n_parallel {n:<4} host ms per admission: baseline {_fmt(b)}  new {_fmt(nw)}  "
              f"host x{row.get('host_speedup', float('nan')):.2f}  wall x{row.get('wall_ratio', float('nan')):.3f}",
              flush=True)
    doc = {"command": "python benchmarks/admission.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "rows": rows}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def _fmt(d: Dict[str, Any]) -> str:
    return "error" if "error" in d else "-" if "host_ms_per_admission" not in d else f"{d['host_ms_per_admission']:.2f}"


if __name__ == "__main__":
    sys.exit(main())
