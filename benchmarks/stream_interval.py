"""What `parallel-gen serve --stream-interval N` saves with many concurrent requests: the
server's CPU per generated token, its event loop's part (HTTP, SSE, JSON), and tokens/s.

One server per setting, all started once and each idle while another runs; rounds
alternate their order. Every round sends C concurrent requests of one prompt each (greedy,
ignore_eos, --max-tokens each) to every server, streamed and then whole (not streamed):

- ``interval 1`` and ``interval N``: this build with ``--stream-interval 1`` (the default)
  and ``N``;
- ``baseline`` (with --baseline-site DIR, a `pip install --target DIR` of the build before):
  its whole responses read every token on the event loop too; this build's read only a
  sequence's first token and its end, whatever the interval.

    python benchmarks/stream_interval.py --clients 64 --interval 8 --baseline-site /tmp/pg-base \\
        --json benchmarks/results-stream-interval.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import Process, Run, cpu_seconds, http_run, prompts_for, write_runs  # noqa: E402

from parallel_gen.model_files import default_model_path  # noqa: E402


async def _whole(url: str, prompts: List[str], max_tokens: int) -> Run:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(prompt: str) -> int:
            r = await client.post("/v1/completions", json={**body, "prompt": prompt})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        tokens = await asyncio.gather(*(one(p) for p in prompts))
        return Run("", len(prompts), 0, sum(tokens), time.perf_counter() - t0)


def measured(name: str, proc: Process, rnd: int, prompts: List[str], max_tokens: int, stream: bool) -> Run:
    pid = proc.proc.pid
    cpu0, loop0 = cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
    run = http_run(proc.url, prompts, max_tokens) if stream else asyncio.run(_whole(proc.url, prompts, max_tokens))
    run.cpu_seconds = cpu_seconds(f"/proc/{pid}/stat") - cpu0
    run.loop_cpu_seconds = cpu_seconds(f"/proc/{pid}/task/{pid}/stat") - loop0
    run.impl, run.round = f"{name}, {'streamed' if stream else 'whole'}", rnd
    print(f"round {rnd}: {run.impl}: {run.tps:.1f} t/s; CPU {run.cpu_ms_per_token:.3f} ms/token, event loop "
          f"{run.loop_ms_per_token:.3f} ms/token", flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent requests, one prompt each (= n_parallel)")
    ap.add_argument("--interval", type=int, default=8, help="the --stream-interval compared with 1")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8150, help="first port (one per server)")
    ap.add_argument("--baseline-site", default=None, help="the build before, installed with pip --target")
    ap.add_argument("--json", default=None, help="write every run to this file")
    args = ap.parse_args()
    model = args.model or default_model_path()

    def command(port: int, interval: int, site: str = "") -> List[str]:
        env = ["env", f"PYTHONPATH={site}"] if site else []
        return env + [sys.executable, "-m", "parallel_gen", "serve", "-m", model, "--port", str(port),
                      "--n-parallel", str(args.clients), "--n-ctx", "256", "--threads", str(args.threads),
                      "--flash-attn", "off", "--max-queue", str(args.clients * 2)] + \
            (["--stream-interval", str(interval)] if interval != 1 else [])

    settings = {"interval 1": command(args.port, 1), f"interval {args.interval}": command(args.port + 1, args.interval)}
    if args.baseline_site:
        settings["baseline"] = command(args.port + 2, 1, args.baseline_site)
    servers: Dict[str, Process] = {}
    runs: List[Run] = []
    prompts = prompts_for(args.clients)
    try:
        for i, (name, cmd) in enumerate(settings.items()):
            servers[name] = Process(cmd, f"http://127.0.0.1:{args.port + i}", "/health")
            http_run(servers[name].url, prompts_for(2), 4)  # warm up
        for rnd in range(1, args.rounds + 1):
            order = list(servers.items())
            for name, proc in (order if rnd % 2 else order[::-1]):
                for stream in (True, False):
                    runs.append(measured(name, proc, rnd, prompts, args.max_tokens, stream))
    finally:
        for proc in servers.values():
            proc.stop()

    print(f"\n{args.clients} concurrent requests x {args.max_tokens} tokens, n_parallel {args.clients}, "
          f"{args.threads} threads; medians of {args.rounds} rounds")
    print("| server | requests | t/s | server CPU ms/token | event loop ms/token |")
    print("|---|---|---:|---:|---:|")
    for impl in dict.fromkeys(r.impl for r in runs):
        mine = [r for r in runs if r.impl == impl]
        name, kind = impl.split(", ")
        print(f"| {name} | {kind} | {statistics.median(r.tps for r in mine):.1f} | "
              f"{statistics.median(r.cpu_ms_per_token for r in mine):.3f} | "
              f"{statistics.median(r.loop_ms_per_token for r in mine):.3f} |")
    if args.json:
        write_runs(args.json, args, runs)


if __name__ == "__main__":
    main()
