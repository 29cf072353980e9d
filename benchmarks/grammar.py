"""Generation throughput with and without a grammar (JSON schema), 16 prompts, one process.

A grammar makes outputs end when the JSON is complete, so the figure is generated tokens
per second of decode time (BatchStats.generation_tokens_per_second) and of wall time,
alternating constrained and free calls with the same prompts and max_tokens.

    PYTHONPATH=python python3 benchmarks/grammar.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import parallel_gen as pg
from parallel_gen.models import default_model_path

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "hobbies"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prompts = [f"Invent person number {i}; describe them as JSON with name, age, city and hobbies:"
               for i in range(args.prompts)]
    rows = {"free": [], "json_schema": []}
    with pg.Model(args.model or default_model_path(), n_parallel=args.prompts, n_ctx=256) as model:
        pg.generate_parallel(model, prompts[:2], max_tokens=4)  # warm up
        for r in range(args.rounds):
            for name, extra in (("free", {}), ("json_schema", {"json_schema": SCHEMA})):
                res = pg.generate_parallel(model, prompts, max_tokens=args.max_tokens, temperature=0.7, seed=r,
                                           **extra)
                s = res.stats
                stopped = [c for c in res if c.finish_reason == "stop"]
                valid = sum(1 for c in stopped if _parses(c.text))
                rows[name].append((s.generation_tokens_per_second, s.completion_tokens / s.wall_seconds))
                print(f"round {r + 1} {name:11s}: {s.completion_tokens} tokens, decode {s.generation_tokens_per_second:.1f}"
                      f" t/s, wall {s.completion_tokens / s.wall_seconds:.1f} t/s"
                      + (f", {valid}/{len(stopped)} complete outputs are valid JSON ({len(res) - len(stopped)} cut by"
                         f" max_tokens)" if extra else ""), flush=True)
    free_dec = statistics.median(x[0] for x in rows["free"])
    con_dec = statistics.median(x[0] for x in rows["json_schema"])
    free_wall = statistics.median(x[1] for x in rows["free"])
    con_wall = statistics.median(x[1] for x in rows["json_schema"])
    print(f"median: free {free_dec:.1f} / {free_wall:.1f} t/s (decode / wall), json_schema {con_dec:.1f} / "
          f"{con_wall:.1f} t/s; constrained/free wall ratio {con_wall / free_wall:.3f}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
