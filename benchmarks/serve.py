"""HTTP serving throughput: `parallel-gen serve` against in-process generate_parallel and
against llama.cpp's own llama-server, same model, threads, prompts and settings.

Every round runs, one after another on a quiet machine: in-process generate_parallel on the
prompts; parallel-gen serve with C concurrent streaming HTTP clients (one prompt each);
llama-server -np N with the same clients. Both servers stay up for the whole run (ports
--port and --port + 1), each idle while the others run. The
figures are ratios of generated tokens per second of wall time within a round, plus the
time to first token (p50/p95) of the HTTP runs, and what each server process spent in CPU
time per generated token (user + system, read from /proc: the decode threads' spinning
included, so it is a cost, not a speed) with, for parallel-gen serve, the part its event
loop thread took (HTTP, SSE, JSON). The two servers take turns going first, round by round,
so a drift of the machine's speed does not favour one.

    benchmarks/build_batched_bench.sh                       # also builds benchmarks/bin/llama-server
    python benchmarks/serve.py --clients 16,64 --rounds 3 --json benchmarks/results-serve.json

Greedy, ignore_eos (every prompt generates --max-tokens), flash attention off on all three
(it changes numerics and speed: compare like with like).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

import parallel_gen as pg
from parallel_gen.model_files import default_model_path

HERE = Path(__file__).resolve().parent


@dataclass
class Run:
    """One measurement: who served, how many clients, what it took."""

    impl: str
    clients: int
    round: int
    tokens: int
    seconds: float
    ttft: List[float] = field(default_factory=list)
    cpu_seconds: Optional[float] = None  # the server process's CPU time (user + system) in the run
    loop_cpu_seconds: Optional[float] = None  # parallel-gen serve: its event loop (main) thread's

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_ms_per_token(self) -> Optional[float]:
        return None if self.cpu_seconds is None else 1000 * self.cpu_seconds / self.tokens

    @property
    def loop_ms_per_token(self) -> Optional[float]:
        return None if self.loop_cpu_seconds is None else 1000 * self.loop_cpu_seconds / self.tokens

    def pct(self, q: float) -> Optional[float]:
        if not self.ttft:
            return None
        xs = sorted(self.ttft)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat) or one of its threads
    (/proc/PID/task/TID/stat); threads that exited are counted in the process's."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prompts_for(n: int) -> List[str]:
    topics = ["the sea", "a city at night", "learning to code", "the history of tea", "mountains", "robots",
              "a rainy day", "the moon", "music", "a long journey", "bread", "winter", "friendship", "trains",
              "gardens", "the desert"]
    return [f"Write a short story about {topics[i % len(topics)]} (number {i}):" for i in range(n)]


class Process:
    """A server subprocess; ready once `ready_path` answers 200."""

    def __init__(self, cmd: List[str], url: str, ready_path: str) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.url = url
        self.log: List[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited:\n{''.join(self.log[-30:])}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[0]} never became ready:\n{''.join(self.log[-30:])}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _clients(url: str, prompts: List[str], body: Dict) -> Run:
    """One streaming /v1/completions request per prompt, all at once."""
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(prompt: str):
            first = None
            tokens = 0
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "prompt": prompt, "stream": True,
                                           "stream_options": {"include_usage": True}}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            return first, tokens

        results = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - t0
    run = Run("", len(prompts), 0, sum(t for _, t in results), seconds, [f for f, _ in results if f is not None])
    return run


def http_run(url: str, prompts: List[str], max_tokens: int) -> Run:
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return asyncio.run(_clients(url, prompts, body))


def write_runs(path: str, args: argparse.Namespace, runs: List[Run]) -> None:
    """Every run, with the arguments that made them, as JSON."""
    with open(path, "w") as f:
        json.dump({"args": vars(args), "runs": [dict(asdict(r), tps=r.tps, cpu_ms_per_token=r.cpu_ms_per_token,
                                                      loop_ms_per_token=r.loop_ms_per_token) for r in runs]},
                  f, indent=1)


def _served(impl: str, proc: Process, rnd: int, prompts: List[str], max_tokens: int) -> Run:
    """One burst of streamed requests on a running server, with its process's CPU time."""
    pid = proc.proc.pid
    cpu0, loop0 = cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat")
    run = http_run(proc.url, prompts, max_tokens)
    run.cpu_seconds = cpu_seconds(f"/proc/{pid}/stat") - cpu0
    if impl == "parallel-gen serve":  # uvicorn's event loop runs on the main thread
        run.loop_cpu_seconds = cpu_seconds(f"/proc/{pid}/task/{pid}/stat") - loop0
    run.impl, run.round = impl, rnd
    loop = f", event loop {run.loop_ms_per_token:.3f}" if run.loop_cpu_seconds is not None else ""
    print(f"round {rnd}: {impl}, {len(prompts)} clients: {run.tps:.1f} t/s, ttft p50 {run.pct(0.5):.2f} s "
          f"p95 {run.pct(0.95):.2f} s; CPU {run.cpu_ms_per_token:.2f} ms/token{loop}", flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--clients", default="16,64", help="concurrent HTTP clients, comma-separated")
    ap.add_argument("--n-parallel", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="parallel-gen serve's --stream-interval (default 1: a chunk per token, as llama-server)")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
                    or str(HERE / "bin" / "llama-server"), help="llama-server binary (skipped if absent)")
    ap.add_argument("--json", default=None, help="write every run to this file")
    args = ap.parse_args()

    model = args.model or default_model_path()
    clients = [int(c) for c in args.clients.split(",")]
    n_ctx = 256  # per sequence: these prompts are ~15 tokens + 128 generated
    ours_cmd = [sys.executable, "-m", "parallel_gen", "serve", "-m", model, "--port", str(args.port),
                "--n-parallel", str(args.n_parallel), "--n-ctx", str(n_ctx), "--threads", str(args.threads),
                "--flash-attn", "off", "--max-queue", str(max(clients) * 2),
                "--stream-interval", str(args.stream_interval)]
    have_llama = Path(args.llama_server).is_file()
    llama_cmd = [args.llama_server, "-m", model, "--port", str(args.port + 1), "--host", "127.0.0.1",
                 "-np", str(args.n_parallel), "-c", str(n_ctx * args.n_parallel), "-t", str(args.threads),
                 "-tb", str(args.threads), "-fa", "off", "--no-webui", "-cb", "--log-disable"]
    if not have_llama:
        print(f"note: no llama-server at {args.llama_server}: build it with benchmarks/build_batched_bench.sh",
              file=sys.stderr)

    runs: List[Run] = []
    # Both servers start once and stay up, each idle while the other runs (an idle server
    # takes no CPU to speak of: 0.02 s in 10 s measured): rounds then follow each other
    # closely, which the VM's speed drift (about +-10% over minutes) needs to resolve a few percent.
    servers: Dict[str, Process] = {}
    try:
        for impl, cmd, port in (("parallel-gen serve", ours_cmd, args.port), ("llama-server", llama_cmd, args.port + 1)):
            if impl == "llama-server" and not have_llama:
                continue
            servers[impl] = Process(cmd, f"http://127.0.0.1:{port}", "/health")
            http_run(servers[impl].url, prompts_for(2), 4)  # warm up
        with pg.Model(model, n_parallel=args.n_parallel, n_ctx=n_ctx, n_threads=args.threads,
                      flash_attn=False) as m:
            pg.generate_parallel(m, prompts_for(2), max_tokens=4)  # warm up
            for rnd in range(1, args.rounds + 1):
                for c in clients:
                    prompts = prompts_for(c)
                    t0 = time.perf_counter()
                    res = pg.generate_parallel(m, prompts, max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
                    runs.append(Run("in-process", c, rnd, res.stats.completion_tokens, time.perf_counter() - t0))
                    print(f"round {rnd}: in-process, {c} prompts: {runs[-1].tps:.1f} t/s", flush=True)
                    # The in-process Model sleeps (its engine thread is idle) while the servers run.
                    order = list(servers.items())
                    for impl, proc in (order if rnd % 2 else order[::-1]):
                        runs.append(_served(impl, proc, rnd, prompts, args.max_tokens))
    finally:
        for proc in servers.values():
            proc.stop()

    print("\n| clients | impl | t/s (median) | x in-process | x llama-server (median, min-max) | TTFT p50 | TTFT p95 "
          "| server CPU ms/token | of it event loop |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in clients:
        base = {r.round: r.tps for r in runs if r.impl == "in-process" and r.clients == c}
        llama = {r.round: r.tps for r in runs if r.impl == "llama-server" and r.clients == c}
        for impl in ("in-process", "parallel-gen serve", "llama-server"):
            mine = [r for r in runs if r.impl == impl and r.clients == c]
            if not mine:
                continue
            x_in = statistics.median(r.tps / base[r.round] for r in mine)
            x_ll = [r.tps / llama[r.round] for r in mine] if llama else []
            ll = f"{statistics.median(x_ll):.3f} ({min(x_ll):.2f}-{max(x_ll):.2f})" if x_ll else ""
            p50 = statistics.median(r.pct(0.5) for r in mine) if mine[0].ttft else None
            p95 = statistics.median(r.pct(0.95) for r in mine) if mine[0].ttft else None
            cpu = statistics.median(r.cpu_ms_per_token for r in mine) if mine[0].cpu_seconds is not None else None
            lp = statistics.median(r.loop_ms_per_token for r in mine) if mine[0].loop_cpu_seconds is not None else None
            print(f"| {c} | {impl} | {statistics.median(r.tps for r in mine):.1f} | {x_in:.3f} | {ll} | "
                  f"{'' if p50 is None else f'{p50:.2f} s'} | {'' if p95 is None else f'{p95:.2f} s'} | "
                  f"{'' if cpu is None else f'{cpu:.2f}'} | {'' if lp is None else f'{lp:.3f}'} |")
    if args.json:
        write_runs(args.json, args, runs)


if __name__ == "__main__":
    main()
