"""The OpenAI server on Ray Serve: the affinity router against Serve's default, same run.

Multi-turn chat, as benchmarks/prompt_cache.py's (a): S concurrent sessions x T turns, a
shared ~300-token system prompt, each session's own ~200-token preamble in its first
turn, canned assistant replies in the history, greedy replies of --reply-tokens tokens,
and a user's think time between turns (uniform in [0, 2 x --think] seconds, the same
seeded pauses for every deployment); each session sends ``X-Session-Id``. Without the
pauses, sessions in lockstep come back just as their own replica frees a slot, and the
default router's shorter-queue choice keeps them there by accident. Three deployments, one after the other:

- ``affinity``: parallel_gen.ray.serve, 2 replicas x 1 thread, AffinityRouter;
- ``default``: the same with Serve's default router (power of two choices), which
  ignores the session id;
- ``one-process``: ``parallel-gen serve`` with 2 threads and the replicas' slots together,
  for reference (no Ray, no ingress hop).

Reported per deployment: wall time, the share of prompt tokens served from cached KV
(usage.prompt_tokens_details.cached_tokens), how many turns landed on another replica
than the session's previous turn, and the mean turn latency.

    flock /tmp/pg-cpu.lock python benchmarks/ray_serve.py --json benchmarks/results-ray-serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prompt_cache import CANNED, preamble, system_prompt  # noqa: E402
from serve import Process  # noqa: E402


@dataclass
class Run:
    impl: str
    round: int
    wall_s: float = 0.0
    turns: int = 0
    turn_s: List[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    replica_switches: int = 0  # turns served by another replica than the session's previous turn
    replicas_used: int = 0


async def sessions(url: str, args: argparse.Namespace, impl: str, rnd: int) -> Run:
    run = Run(impl, rnd)
    system = system_prompt()
    used = set()
    limits = httpx.Limits(max_connections=args.sessions + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def session(sid: int) -> None:
            messages = [{"role": "system", "content": system}]
            last = None
            pauses = random.Random(1000 * rnd + sid)
            for t in range(args.turns):
                await asyncio.sleep(pauses.uniform(0, 2 * args.think))
                own = preamble(sid) if t == 0 else ""
                messages.append({"role": "user", "content": f"{own}Customer {sid}, message {t}: can you check the "
                                                            f"status of my order number {1000 * sid + 17 * t}?"})
                body = {"messages": messages, "max_tokens": args.reply_tokens, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": f"s{rnd}-{sid}"})
                r.raise_for_status()
                run.turn_s.append(time.perf_counter() - t0)
                usage = r.json()["usage"]
                run.turns += 1
                run.prompt_tokens += usage["prompt_tokens"]
                run.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
                replica = r.headers.get("x-replica-id", "one")
                used.add(replica)
                run.replica_switches += last is not None and replica != last
                last = replica
                messages.append({"role": "assistant", "content": CANNED})

        t0 = time.perf_counter()
        await asyncio.gather(*(session(s) for s in range(args.sessions)))
        run.wall_s = time.perf_counter() - t0
    run.replicas_used = len(used)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4, help="n_parallel of each replica")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds a user waits before each turn")
    ap.add_argument("--json", help="write the runs and the summary here")
    args = ap.parse_args()

    import ray

    from parallel_gen.model_files import default_model_path
    from parallel_gen.ray import serve

    model = args.model or default_model_path()
    options = dict(n_threads=1, n_parallel=args.slots, n_ctx=2048)
    runs: List[Run] = []
    # One cluster for both Serve deployments: its CPUs are the replicas' threads (+1).
    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        for rnd in range(args.rounds):
            for router in (("affinity", "default") if rnd % 2 == 0 else ("default", "affinity")):
                app = serve(model, replicas=args.replicas, router=router, port=port, name=f"bench_{router}",
                            model_options=options)
                try:
                    runs.append(asyncio.run(sessions(app.url, args, router, rnd)))
                    print(f"round {rnd} {router}: {runs[-1].wall_s:.2f} s", file=sys.stderr, flush=True)
                finally:
                    app.shutdown()
    finally:
        from ray import serve as ray_serve

        ray_serve.shutdown()
        ray.shutdown()
    # The same machine without Ray: one process, the replicas' threads and slots together.
    one_port = free_port()
    for rnd in range(args.rounds):
        p = Process([sys.executable, "-m", "parallel_gen", "serve", "--model", model, "--port", str(one_port),
                     "--threads", str(args.replicas), "--n-parallel", str(args.slots * args.replicas),
                     "--n-ctx", "2048"], f"http://127.0.0.1:{one_port}", "/health")
        try:
            runs.append(asyncio.run(sessions(p.url, args, "one-process", rnd)))
        finally:
            p.stop()

    summary: Dict[str, Dict[str, float]] = {}
    for impl in ("affinity", "default", "one-process"):
        mine = [r for r in runs if r.impl == impl]
        summary[impl] = {
            "wall_s": statistics.median(r.wall_s for r in mine),
            "cached_share": sum(r.cached_tokens for r in mine) / max(1, sum(r.prompt_tokens for r in mine)),
            "replica_switches": sum(r.replica_switches for r in mine) / len(mine),
            "mean_turn_s": statistics.mean(t for r in mine for t in r.turn_s),
        }
    base = summary["default"]["wall_s"]
    for impl, s in summary.items():
        s["speedup_vs_default"] = base / s["wall_s"]
        print(f"{impl:12s} wall {s['wall_s']:6.2f} s  x{s['speedup_vs_default']:.2f} vs default  cached "
              f"{100 * s['cached_share']:5.1f}%  replica switches {s['replica_switches']:.0f}  mean turn "
              f"{s['mean_turn_s']:.2f} s")
    if args.json:
        meta = {"command": "python benchmarks/ray_serve.py " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
                "sessions": args.sessions, "turns": args.turns, "reply_tokens": args.reply_tokens, "think_s": args.think,
                "replicas": args.replicas, "slots_per_replica": args.slots, "model": os.path.basename(model)}
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
