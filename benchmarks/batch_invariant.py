"""What batch-invariant mode (ModelConfig(batch_invariant=True)) costs, and what it buys.

One process, one model, the two modes alternating round by round on the same prompts:

  16 active    16 prompts at n_parallel 16, greedy, --max-tokens tokens each
  4 active     4 prompts at n_parallel 4 (each generation step padded from 4 rows to the minimum)
  1 active     1 prompt at a time (padded from 1 row)
  prefix       16 prompts sharing a ~300-token instruction (the default mode decodes it once
               and copies its KV; the invariant mode prefills every prompt whole)

Reported: the median wall seconds of each mode, the invariant/default ratio, padding rows,
and for the 16 prompts how many give bit-identical tokens batched (16 active) and alone
(1 active) in each mode.

    python benchmarks/batch_invariant.py --model GEMMA.gguf --rounds 3 --json benchmarks/results-batch-invariant.json
    python benchmarks/batch_invariant.py --rounds 1 --max-tokens 8     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, List

import parallel_gen as pg
from parallel_gen.model_files import default_model_path

TOPICS = ["the capital of France", "autumn leaves", "photosynthesis", "prime numbers", "the German language",
          "the blue sky", "pancakes", "cats", "multiplication", "the solar system", "Hamlet", "vaccines",
          "programmers", "earthquakes", "bakeries", "recursion"]
PROMPTS = [f"Question {i}: tell me about {t}." for i, t in enumerate(TOPICS)]
INSTRUCTION = ("You are a careful assistant. " + " ".join(
    f"Rule {i}: answer in plain words, cite nothing, and keep to the topic number {i}." for i in range(20)))


def run(model: str, prompts: List[str], n_parallel: int, invariant: bool, max_tokens: int, flash_attn: bool,
        one_at_a_time: bool = False) -> Dict:
    with pg.Model(model, n_parallel=n_parallel, n_ctx=512, flash_attn=flash_attn, batch_invariant=invariant) as m:
        t0 = time.perf_counter()
        if one_at_a_time:
            results = [pg.generate_parallel(m, p, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                       for p in prompts]
            tokens = [r[0].token_ids for r in results]
            padding = sum(r.stats.padding_rows for r in results)
        else:
            r = pg.generate_parallel(m, prompts, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            tokens = [c.token_ids for c in r]
            padding = r.stats.padding_rows
        return {"seconds": time.perf_counter() - t0, "tokens": tokens, "padding_rows": padding}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--flash-attn", choices=["on", "off"], default="off")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    model = a.model or str(default_model_path())
    fa = a.flash_attn == "on"
    workloads = {
        "16 active": dict(prompts=PROMPTS, n_parallel=16),
        "4 active": dict(prompts=PROMPTS[:4], n_parallel=4),
        "1 active": dict(prompts=PROMPTS, n_parallel=1, one_at_a_time=True),
        "prefix": dict(prompts=[f"{INSTRUCTION}\n\n{p}" for p in PROMPTS], n_parallel=16),
    }
    seconds: Dict[str, Dict[str, List[float]]] = {w: {"default": [], "invariant": []} for w in workloads}
    last: Dict[str, Dict[str, Dict]] = {w: {} for w in workloads}
    load = os.getloadavg()
    for rnd in range(a.rounds):
        modes = ["default", "invariant"] if rnd % 2 == 0 else ["invariant", "default"]
        for w, kw in workloads.items():
            for mode in modes:
                r = run(model, max_tokens=a.max_tokens, flash_attn=fa, invariant=mode == "invariant", **kw)
                seconds[w][mode].append(r["seconds"])
                last[w][mode] = r
    report = {"model": os.path.basename(model), "max_tokens": a.max_tokens, "flash_attn": fa, "rounds": a.rounds,
              "load_before": load, "load_after": os.getloadavg(), "workloads": {}}
    for w in workloads:
        d, i = statistics.median(seconds[w]["default"]), statistics.median(seconds[w]["invariant"])
        report["workloads"][w] = {"default_s": round(d, 3), "invariant_s": round(i, 3), "ratio": round(i / d, 3),
                                  "padding_rows": last[w]["invariant"]["padding_rows"]}
        print(f"{w:10s}  default {d:7.2f} s  invariant {i:7.2f} s  ratio {i / d:5.2f}x  "
              f"padding rows {last[w]['invariant']['padding_rows']}")
    for mode in ("default", "invariant"):
        batched, alone = last["16 active"][mode]["tokens"], last["1 active"][mode]["tokens"]
        same = sum(b == s for b, s in zip(batched, alone))
        report[f"identical_{mode}"] = same
        print(f"{mode:9s}: {same}/16 prompts bit-identical batched and alone")
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
