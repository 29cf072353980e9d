"""Tool calls in a batch: chat_parallel(tools=..., tool_choice="required") against the same
call constrained by an equivalent JSON schema.

Both runs get the same conversations, prompts and model (SmolLM2-135M, its own template,
so the generic tool format: a system block listing the tools, a JSON reply), greedy:

  tools     chat_parallel(model, convs, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=False): prompt rendering with the tools block, the reply
            grammar built from the tools, the replies parsed into ToolCalls
  schema    chat_parallel(model, convs + the same system block,
            json_schema=<the reply shape as one JSON schema>): what a user does by hand

They alternate, tools first, for --rounds rounds. Reported: the median wall seconds and
generated tokens/s of each, and tools' throughput relative to schema's (target >= 0.9x),
after checking the prompts are identical and every conversation got a call.

    flock /tmp/pg-cpu.lock .venv/bin/python benchmarks/tools.py --rounds 3 --json benchmarks/results-tools.json
    .venv/bin/python benchmarks/tools.py --conversations 4 --rounds 1          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List

import parallel_gen as pg
from parallel_gen.model_files import default_model_path
from parallel_gen.tools import GENERIC, tool_request

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone.",
                                      "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                     "required": ["timezone"]}}},
    {"type": "function", "function": {"name": "search_flights", "description": "Flights between two cities.",
                                      "parameters": {"type": "object", "properties": {
                                          "origin": {"type": "string"}, "destination": {"type": "string"},
                                          "max_stops": {"type": "integer"}}, "required": ["origin", "destination"]}}},
]
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai"]
_ASKS = ["What is the weather in {a}?", "What time is it in {a}?", "Find me a flight from {a} to {b}.",
         "Is it raining in {a} right now?", "I am flying from {a} to {b} tomorrow: any direct flights?",
         "What should I wear in {a} today?", "When does the sun set in {a}?", "Book me something from {a} to {b}."]


def conversations(n: int) -> List[List[Dict[str, str]]]:
    """n distinct one-question conversations, deterministic."""
    out = []
    for k in range(n):
        a, b = _CITIES[k % len(_CITIES)], _CITIES[(k // len(_CITIES) + k + 1) % len(_CITIES)]
        out.append([{"role": "user", "content": _ASKS[(k // len(_CITIES) + k) % len(_ASKS)].format(a=a, b=b)}])
    return out


def reply_schema() -> Dict[str, Any]:
    """The generic format's reply to tool_choice="required" with one call, as a JSON schema."""
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "arguments": t["function"]["parameters"]},
                       "required": ["name", "arguments"]} for t in TOOLS]}
    return {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                                            "maxItems": 1}}, "required": ["tool_calls"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-parallel", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    path = args.model or str(default_model_path())
    convs = conversations(args.conversations)
    block = GENERIC.system_block(tool_request(TOOLS, "required", False))
    by_hand = [[{"role": "system", "content": block}] + c for c in convs]
    schema = reply_schema()
    seconds: Dict[str, List[float]] = {"tools": [], "schema": []}
    tok_s: Dict[str, List[float]] = {"tools": [], "schema": []}
    tokens: Dict[str, int] = {}
    with pg.Model(path, n_parallel=args.n_parallel, n_ctx=1024, n_threads=args.threads) as model:
        runs = {
            "tools": lambda: pg.chat_parallel(model, convs, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=args.max_tokens),
            "schema": lambda: pg.chat_parallel(model, by_hand, json_schema=schema, temperature=0,
                                               max_tokens=args.max_tokens),
        }
        runs["tools"]()  # warm-up (page cache, thread pools)
        last: Dict[str, Any] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                r = run()
                seconds[name].append(time.perf_counter() - t0)
                tok_s[name].append(r.stats.generation_tokens_per_second)
                tokens[name] = r.stats.completion_tokens
                last[name] = r
    assert [c.prompt for c in last["tools"]] == [c.prompt for c in last["schema"]], "the prompts differ"
    calls = sum(1 for c in last["tools"] if c.tool_calls)
    same = sum(a.token_ids == b.token_ids for a, b in zip(last["tools"], last["schema"]))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    med_tok = {k: statistics.median(v) for k, v in tok_s.items()}
    result = {
        "model": os.path.basename(path), "conversations": len(convs), "rounds": args.rounds,
        "max_tokens": args.max_tokens, "n_parallel": args.n_parallel, "threads": args.threads,
        "median_seconds": med, "seconds": seconds,
        "median_generation_tokens_per_second": med_tok, "completion_tokens": tokens,
        "calls_parsed": calls, "identical_outputs": same,
        "throughput_ratio_wall": med["schema"] / med["tools"],
        "throughput_ratio_generation": med_tok["tools"] / med_tok["schema"],
    }
    print(f"{len(convs)} conversations, {args.rounds} rounds: tools {med['tools']:.2f} s "
          f"({med_tok['tools']:.1f} gen tok/s), schema {med['schema']:.2f} s ({med_tok['schema']:.1f} gen tok/s)")
    print(f"tools / schema throughput: {result['throughput_ratio_wall']:.3f}x end to end, "
          f"{result['throughput_ratio_generation']:.3f}x generation; {calls}/{len(convs)} calls parsed, "
          f"{same}/{len(convs)} outputs token-identical")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
