"""Sharing a server (issue 29): fair admission across API keys, and the Redis result
cache's lookup cost.

(a) ``fairness``: ``parallel-gen serve --api-keys`` on 4 slots with 4 keys. Key ``flood``
    keeps --flood-requests requests of 32 prompts in flight (a new one as each ends);
    keys ``i1``, ``i2``, ``i3`` each send one short chat request every second for
    --seconds. The interactive requests' latency, p50 and p95, with fair admission (the
    default) and with ``--no-fair-admission`` (turns across requests, whoever sent them),
    alternating round by round, a fresh server each time.
(b) ``redis``: the cost of the result cache per request. In-process: ResultCache.key +
    get for a hit in the memory level, a hit in Redis (an LRU of 0 entries), against
    generating the same greedy request. Over HTTP: a repeated greedy request to a server
    with ``--result-cache redis://...`` against the same server decoding it (a fresh
    prompt each time).

    flock /tmp/pg-cpu.lock python benchmarks/gateway.py --rounds 2 --json benchmarks/results-gateway.json

Needs redis-server on PATH (Debian's redis-server) for (b).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import httpx

import parallel_gen as pg
from parallel_gen.model_files import default_model_path

KEYS = {name: f"sk-bench-{name}-000" for name in ("flood", "i1", "i2", "i3")}


def start_server(model: str, *args: str) -> "tuple[subprocess.Popen, str]":
    cmd = [sys.executable, "-m", "parallel_gen", "serve", "-m", model, "--port", "0", "--threads", "2",
           "--n-ctx", "512", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    found: List[int] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                found.append(int(m.group(1)))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        raise SystemExit("the server did not start")
    url = f"http://127.0.0.1:{found[0]}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the model never became ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def fairness_round(url: str, seconds: float, flood_requests: int) -> List[float]:
    latencies: List[float] = []
    done = asyncio.Event()

    async def flood() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     headers={"Authorization": f"Bearer {KEYS['flood']}"}) as c:
            while not done.is_set():
                await c.post("/v1/completions", json={"prompt": [f"Chapter {i}." for i in range(32)],
                                                      "max_tokens": 32, "ignore_eos": True, "temperature": 0})

    async def interactive(name: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     headers={"Authorization": f"Bearer {KEYS[name]}"}) as c:
            async def one(k: int) -> None:
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"Say hello to user {name}-{k}."}],
                    "max_tokens": 16, "ignore_eos": True, "temperature": 0})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

            tasks = []
            for k in range(int(seconds)):
                tasks.append(asyncio.ensure_future(one(k)))
                await asyncio.sleep(1.0)
            await asyncio.gather(*tasks)

    floods = [asyncio.ensure_future(flood()) for _ in range(flood_requests)]
    await asyncio.sleep(3.0)  # the flood's queue fills first
    await asyncio.gather(*(interactive(n) for n in ("i1", "i2", "i3")))
    done.set()
    for f in floods:
        f.cancel()
    return latencies


def fairness(model: str, rounds: int, seconds: float, flood_requests: int) -> Dict[str, Dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "keys.json"
        path.write_text(json.dumps({"keys": [{"name": n, "key": k} for n, k in KEYS.items()]}))
        samples: Dict[str, List[float]] = {"fair": [], "first-come": []}
        for r in range(rounds):
            for mode in ("fair", "first-come"):
                extra = [] if mode == "fair" else ["--no-fair-admission"]
                proc, url = start_server(model, "--n-parallel", "4", "--max-queue", "512", "--api-keys", str(path),
                                         *extra)
                try:
                    lat = asyncio.run(fairness_round(url, seconds, flood_requests))
                finally:
                    stop(proc)
                samples[mode].extend(lat)
                print(f"round {r + 1} {mode}: p50 {pct(lat, 0.5):.2f} s, p95 {pct(lat, 0.95):.2f} s "
                      f"({len(lat)} requests)", flush=True)
    return {m: {"p50_s": pct(v, 0.5), "p95_s": pct(v, 0.95), "requests": len(v)} for m, v in samples.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_cost(model: str, repeats: int) -> Dict[str, float]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        params = pg.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        prompt = "The capital of France is"
        out: Dict[str, float] = {}
        with pg.Model(model, n_parallel=4, n_ctx=512, n_threads=2) as m:
            t0 = time.perf_counter()
            for i in range(repeats):
                pg.generate_parallel(m, [f"{prompt} {i}"], params)
            out["inprocess_generate_ms"] = 1000 * (time.perf_counter() - t0) / repeats
            for level, entries in (("memory", 1024), ("redis", 0)):
                with pg.ResultCache(url, memory_entries=entries) as cache:
                    pg.generate_parallel(m, [prompt], params, cache=cache)  # stored
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        hit = cache.get(cache.key(m, prompt, params.replace(seed=None)))
                        assert hit is not None
                    out[f"inprocess_hit_{level}_ms"] = 1000 * (time.perf_counter() - t0) / repeats
        proc, srv = start_server(model, "--n-parallel", "4", "--result-cache", url)
        try:
            with httpx.Client(base_url=srv, timeout=120) as c:
                body = {"max_tokens": 16, "ignore_eos": True, "temperature": 0}
                c.post("/v1/completions", json={**body, "prompt": prompt})
                for name, fresh in (("http_decode_ms", True), ("http_hit_ms", False)):
                    t0 = time.perf_counter()
                    for i in range(repeats):
                        r = c.post("/v1/completions", json={**body, "prompt": f"{prompt} {i}" if fresh else prompt})
                        r.raise_for_status()
                    out[name] = 1000 * (time.perf_counter() - t0) / repeats
        finally:
            stop(proc)
        return out
    finally:
        redis.kill()
        redis.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("PG_MODEL") or default_model_path())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20, help="interactive requests: one per key per second")
    ap.add_argument("--flood-requests", type=int, default=4, help="the flooding key's requests in flight")
    ap.add_argument("--repeats", type=int, default=30, help="requests per Redis cost figure")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    result = {"fairness": fairness(args.model, args.rounds, args.seconds, args.flood_requests),
              "redis": redis_cost(args.model, args.repeats)}
    f, u = result["fairness"]["fair"], result["fairness"]["first-come"]
    result["ratios"] = {"p50_first_come_over_fair": u["p50_s"] / f["p50_s"],
                        "p95_first_come_over_fair": u["p95_s"] / f["p95_s"],
                        "http_decode_over_hit": result["redis"]["http_decode_ms"] / result["redis"]["http_hit_ms"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
