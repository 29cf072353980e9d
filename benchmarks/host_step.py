"""Host work per decode step (issue 27): the engine's time between two llama_decode calls,
for the build under test against an older build, side by side in one run.

    python benchmarks/host_step.py --baseline-site /tmp/pg-old -o benchmarks/results-host-step.json

--backend-sampling: instead of an older build, the same build with
ModelConfig.backend_sampling off (baseline) against on (new), side by side:

    python benchmarks/host_step.py --backend-sampling -o benchmarks/results-backend-sampling.json

--baseline-site: a folder holding another parallel_gen build (``pip install --no-deps
--target DIR .`` from an older checkout, with a ``llama_cpp`` link beside it to the same
llama-cpp-python), put first on the path of the baseline's runs. Each case runs in a fresh
process, the two builds alternating, so both see the same machine.

Method (the issue's, so old and new are measured alike): one generate_parallel call of
n_parallel prompts x 32 tokens with ignore_eos, flash attention off, after a 4-prompt
warm-up call; host ms/step = (wall - prompt_seconds - generation_seconds) / decode_calls.
The new build also reports BatchStats.host_ms_per_step (the engine's own clock, without
Python's share of the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

CASES = [  # (model, n_parallel, sampled)
    ("smollm2", 16, False), ("smollm2", 16, True),
    ("smollm2", 64, False), ("smollm2", 64, True),
    ("smollm2", 255, False), ("smollm2", 255, True),
    ("smollm2", 256, False),
    ("gemma3", 16, False), ("gemma3", 16, True),
    ("gemma3", 64, False), ("gemma3", 64, True),
]

CHILD = r"""
import json, sys, time
import parallel_gen as pg
from parallel_gen import model_files
which, n, sampled, threads, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
extra = json.loads(sys.argv[6])  # more ModelConfig settings
path = model_files.smollm2_path() if which == "smollm2" else model_files.gemma3_path()
prompts = [f"Story {i}: once upon a time" for i in range(n)]
kw = dict(max_tokens=tokens, ignore_eos=True, temperature=0.8 if sampled else 0.0)
if sampled:
    kw.update(top_p=0.95, seed=1)
out = {"build": pg.__file__}
try:
    with pg.Model(path, n_parallel=n, n_ctx=64, n_threads=threads, flash_attn=False, **extra) as m:
        pg.generate_parallel(m, prompts[:4], **kw)
        t0 = time.perf_counter()
        r = pg.generate_parallel(m, prompts, **kw)
        wall = time.perf_counter() - t0
    s = r.stats
    decode = s.prompt_seconds + s.generation_seconds
    out.update(wall_s=wall, decode_s=decode, decode_calls=s.decode_calls, completion_tokens=s.completion_tokens,
               host_ms_step=1000 * (wall - decode) / s.decode_calls, e2e_tps=s.completion_tokens / wall,
               engine_host_ms_step=getattr(s, "host_ms_per_step", None), failed=s.failed,
               backend_sampled_tokens=getattr(s, "backend_sampled_tokens", None))
except Exception as e:  # the old build cannot load n_parallel 256: a row, not a crash
    out["error"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
"""


def run_child(child: str, args: List[str], site: Optional[str]) -> Dict[str, Any]:
    """Runs `child` (Python printing one ``RESULT {json}`` line) in a fresh process, the build
    in folder `site` (the baseline) first on its path; an error row if it printed none."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, env=env, timeout=1800)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (p.stderr or p.stdout)[-500:]}


def run_case(site: Optional[str], model: str, n: int, sampled: bool, threads: int, tokens: int,
             settings: Dict[str, Any]) -> Dict[str, Any]:
    return run_child(CHILD, [model, str(n), "1" if sampled else "0", str(threads), str(tokens), json.dumps(settings)],
                     site)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-site", help="folder with the baseline build of parallel_gen")
    ap.add_argument("--backend-sampling", action="store_true",
                    help="compare backend_sampling off (baseline) and on (new) in this build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", help="comma-separated n_parallel values to run (default: all)")
    ap.add_argument("-o", "--output", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    only = {int(x) for x in args.only.split(",")} if args.only else None
    rows = []
    for model, n, sampled in CASES:
        if only and n not in only:
            continue
        row: Dict[str, Any] = dict(model=model, n_parallel=n, sampling="temperature 0.8, top_p 0.95" if sampled else "greedy")
        if args.backend_sampling:
            runs = [("baseline", None, {"backend_sampling": False}), ("new", None, {"backend_sampling": True})]
        else:
            runs = [("new", None, {})] if not args.baseline_site else [("baseline", args.baseline_site, {}),
                                                                      ("new", None, {})]
        for name, site, settings in runs:
            row[name] = run_case(site, model, n, sampled, args.threads, args.tokens, settings)
        b, nw = row.get("baseline", {}), row["new"]
        if "host_ms_step" in b and "host_ms_step" in nw:
            row["host_speedup"] = b["host_ms_step"] / nw["host_ms_step"]
            row["e2e_ratio"] = nw["e2e_tps"] / b["e2e_tps"]
        rows.append(row)
        print(f"{model:8} B={n:<4} {row['sampling']:28} baseline {fmt(b, 'host_ms_step')} ms/step  "
              f"new {fmt(nw, 'host_ms_step')} ms/step (engine {fmt(nw, 'engine_host_ms_step')})  "
              f"e2e x{row.get('e2e_ratio', float('nan')):.3f}", flush=True)
    doc = {"command": "python benchmarks/host_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "tokens": args.tokens,
           "cpu": _cpu(), "rows": rows}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def fmt(d: Dict[str, Any], key: str) -> str:
    v = d.get(key)
    return "error" if "error" in d else "-" if v is None else f"{v:.1f}"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
