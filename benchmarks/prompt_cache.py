"""The prompt cache (KV that outlives a request), side by side with the build without it.

Three measurements, each alternating its implementations round by round so that drift in
a shared machine's load hits them all:

(a) ``chat``: multi-turn chat through HTTP. S concurrent sessions x T turns, each with a
    ~300-token system prompt, canned assistant replies in the history, greedy replies of
    --reply-tokens tokens. ``parallel-gen serve`` (cache on), ``parallel-gen serve
    --no-prompt-cache`` and llama-server ``-np S`` (its slots keep their KV, as it does by
    default), same model, threads, slots and context per slot, a fresh server per round.
    Wall time and per-turn latency.
(b) ``calls``: in-process, C calls of P prompts that share a ~300-token instruction (a new
    short review per prompt), Model(prompt_cache=True) against prompt_cache=False: the
    prompt phase (BatchStats.prompt_seconds) per call, and the share of greedy outputs that
    are identical with and without the cache.
(b') ``repeat``: in-process, a call of one prompt, then a second call whose one prompt
    repeats the first's instruction (the issue's case): the second call's prompt phase with
    and without the cache.
(c) ``noreuse``: ``parallel-gen bench --workload short,ragged`` with and without
    ``--no-prompt-cache``: workloads where nothing is reused, to show the cache costs them
    nothing beyond the machine's spread.
(d) ``crossover``: in-process, the host tier's cost (ModelConfig.cache_ram): a session of
    L prompt tokens is pushed out of its KV stream (saved to host memory) and restored for
    its next turn; save and restore time per 1,000 tokens beside decoding them.

    benchmarks/build_batched_bench.sh llama-batched-bench llama-server   # for (a)
    flock /tmp/pg-cpu.lock python benchmarks/prompt_cache.py --rounds 3 --json benchmarks/results-prompt-cache.json

More sessions than slots (the host tier, issue 32): (a) with --slots below --sessions;
--preamble gives each session ~200 tokens of its own after the shared system prompt,
--system-policies sizes that prompt (8: ~150 tokens, 16: ~300); --host-tier adds
``serve --cache-ram 0`` (the build before the tier) beside the default:

    flock /tmp/pg-cpu.lock python benchmarks/prompt_cache.py --only chat --rounds 1 --host-tier \
        --sessions 12 --turns 3 --slots 4 --preamble --system-policies 8
    flock /tmp/pg-cpu.lock python benchmarks/prompt_cache.py --only chat --rounds 1 --host-tier \
        --sessions 16 --turns 4 --slots 4
    flock /tmp/pg-cpu.lock python benchmarks/prompt_cache.py --only crossover

Flash attention off everywhere (it changes numerics and speed: compare like with like).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

import parallel_gen as pg
from parallel_gen.model_files import default_model_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve import Process  # noqa: E402  (a server subprocess, ready once it answers)

def system_prompt(policies: int = 16) -> str:
    """~19 tokens per policy (SmolLM2): 16 give ~300 tokens, 8 ~150."""
    return ("You are the support assistant of a small bookshop. Answer in a friendly, precise way. "
            + " ".join(f"Policy {i}: orders of category {i} ship within {i % 5 + 1} days; returns of category {i} "
                       f"are accepted for {10 + i} days with a receipt." for i in range(policies)))


def preamble(sid: int) -> str:
    """A session's own ~200 tokens (SmolLM2), different from its first words on."""
    return (f"Customer {sid} account history. "
            + " ".join(f"On day {3 * k + sid} customer {sid} ordered book {97 * sid + 13 * k} "
                       f"(shelf {chr(65 + (sid + k) % 26)}{k})." for k in range(10)) + " ")


SYSTEM = system_prompt()
CANNED = ("Thank you for your question. I have checked our records and everything looks in order; "
          "let me know if there is anything else I can help you with today.")
REVIEWS = ["Great.", "Awful.", "Loved it!", "Too slow.", "Fine.", "Meh.", "Superb!", "Broken.",
           "Nice.", "Bad.", "Cheap.", "Pricey.", "Cozy.", "Noisy.", "Fresh.", "Stale."]
INSTRUCTION = ("You are a careful annotator. Read the customer review below and classify its sentiment as "
               "positive, negative or neutral. Consider tone, wording and context; sarcasm counts as negative. "
               "Reply with the label only. ") * 7  # ~300 tokens (SmolLM2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- (a) multi-turn chat through HTTP ----------------------------------------------------------
@dataclass
class ChatRun:
    impl: str
    round: int
    wall_s: float
    turn_s: List[float] = field(default_factory=list)  # every turn of every session
    turn_by_index: Dict[int, List[float]] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0


async def chat_sessions(url: str, args: argparse.Namespace, impl: str, rnd: int) -> ChatRun:
    sessions, turns, reply_tokens = args.sessions, args.turns, args.reply_tokens
    run = ChatRun(impl, rnd, 0.0)
    system = system_prompt(args.system_policies)
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def session(sid: int) -> None:
            messages = [{"role": "system", "content": system}]
            for t in range(turns):
                own = preamble(sid) if args.preamble and t == 0 else ""
                messages.append({"role": "user", "content": f"{own}Customer {sid}, message {t}: can you check the "
                                                            f"status of my order number {1000 * sid + 17 * t}?"})
                body = {"messages": messages, "max_tokens": reply_tokens, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                dt = time.perf_counter() - t0
                usage = r.json()["usage"]
                run.turn_s.append(dt)
                run.turn_by_index.setdefault(t, []).append(dt)
                run.prompt_tokens += usage["prompt_tokens"]
                run.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                messages.append({"role": "assistant", "content": CANNED})

        t0 = time.perf_counter()
        await asyncio.gather(*(session(s) for s in range(sessions)))
        run.wall_s = time.perf_counter() - t0
    return run


def bench_chat(args: argparse.Namespace, model: str) -> List[ChatRun]:
    url = f"http://127.0.0.1:{args.port}"
    n_ctx = 2048  # per slot: the last turn's prompt is ~800 tokens
    slots = args.slots or args.sessions
    ours = [sys.executable, "-m", "parallel_gen", "serve", "-m", model, "--port", str(args.port),
            "--n-parallel", str(slots), "--n-ctx", str(n_ctx), "--threads", str(args.threads),
            "--flash-attn", "off"]
    impls = [("serve (cache)", ours, "/health")]
    if args.host_tier:  # the build before the host tier: the same server with --cache-ram 0
        impls.append(("serve (cache_ram 0)", ours + ["--cache-ram", "0"], "/health"))
    else:
        impls.append(("serve (no cache)", ours + ["--no-prompt-cache"], "/health"))
    if Path(args.llama_server).is_file():
        impls.append(("llama-server", [args.llama_server, "-m", model, "--port", str(args.port), "--host",
                                       "127.0.0.1", "-np", str(slots), "-c", str(n_ctx * slots),
                                       "-t", str(args.threads), "-tb", str(args.threads), "-fa", "off",
                                       "--no-webui", "--log-disable"], "/health"))
    else:
        log(f"note: no llama-server at {args.llama_server}: build it with "
            "benchmarks/build_batched_bench.sh llama-batched-bench llama-server")
    runs: List[ChatRun] = []
    for rnd in range(1, args.rounds + 1):
        order = impls if rnd % 2 else impls[::-1]
        for name, cmd, ready in order:
            proc = Process(cmd, url, ready)
            try:
                run = asyncio.run(chat_sessions(url, args, name, rnd))
            finally:
                proc.stop()
            runs.append(run)
            log(f"(a) round {rnd}: {name}: wall {run.wall_s:.1f} s, turn p50 {pct(run.turn_s, 0.5):.2f} s, "
                f"cached {run.cached_tokens}/{run.prompt_tokens} prompt tokens")
    return runs


def report_chat(runs: List[ChatRun]) -> List[str]:
    base = "serve (cache_ram 0)" if any(r.impl == "serve (cache_ram 0)" for r in runs) else "serve (no cache)"
    out = [f"| implementation | wall (median) | x {base[7:-1]} | x llama-server | turn p50 | turn p95 | "
           "last turn p50 | cached / prompt tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r.impl, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    for impl in dict.fromkeys(r.impl for r in runs):
        mine = [r for r in runs if r.impl == impl]

        def ratio(other: str) -> str:
            xs = [by[(other, k)].wall_s / by[(impl, k)].wall_s for k in rounds if (other, k) in by and (impl, k) in by]
            return f"{statistics.median(xs):.2f}" if xs else ""

        last = max(mine[0].turn_by_index)
        out.append(f"| {impl} | {statistics.median(r.wall_s for r in mine):.1f} s | {ratio(base)} | "
                   f"{ratio('llama-server')} | {statistics.median(pct(r.turn_s, 0.5) for r in mine):.2f} s | "
                   f"{statistics.median(pct(r.turn_s, 0.95) for r in mine):.2f} s | "
                   f"{statistics.median(pct(r.turn_by_index[last], 0.5) for r in mine):.2f} s | "
                   f"{mine[0].cached_tokens} / {mine[0].prompt_tokens} |")
    out.append("(x columns: the other's wall time / this one's, per round, median: above 1 is faster)")
    return out


# -- (b) in-process calls sharing an instruction -------------------------------------------------
@dataclass
class CallsRun:
    cache: bool
    round: int
    prompt_s: List[float]        # per call
    decoded: List[int]           # prompt tokens decoded per call
    outputs: List[List[int]]     # every prompt's greedy tokens, in order


def bench_calls(args: argparse.Namespace, model: str) -> List[CallsRun]:
    runs: List[CallsRun] = []
    prompts = [[f"{INSTRUCTION}Review ({c}.{i}): {REVIEWS[i % len(REVIEWS)]}\nLabel:" for i in range(args.prompts)]
               for c in range(args.calls)]
    for rnd in range(1, args.rounds + 1):
        for cache in ((True, False) if rnd % 2 else (False, True)):
            with pg.Model(model, n_parallel=args.prompts, n_ctx=512, n_threads=args.threads, flash_attn=False,
                          prompt_cache=cache) as m:
                pg.generate_parallel(m, "Warm-up.", max_tokens=2, temperature=0)
                run = CallsRun(cache, rnd, [], [], [])
                for ps in prompts:
                    r = pg.generate_parallel(m, ps, max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
                    s = r.stats
                    run.prompt_s.append(s.prompt_seconds)
                    run.decoded.append(s.prompt_tokens - s.cached_prompt_tokens - s.prefix_tokens_reused)
                    run.outputs.extend(c.token_ids for c in r)
            runs.append(run)
            log(f"(b) round {rnd}: cache {cache}: prompt s per call "
                + " ".join(f"{x:.2f}" for x in run.prompt_s) + f"; decoded {run.decoded}")
    return runs


def report_calls(runs: List[CallsRun]) -> List[str]:
    rounds = sorted({r.round for r in runs})
    on = {r.round: r for r in runs if r.cache}
    off = {r.round: r for r in runs if not r.cache}
    first = statistics.median(off[k].prompt_s[0] / on[k].prompt_s[0] for k in rounds)
    later = statistics.median(statistics.median(b / a for a, b in zip(on[k].prompt_s[1:], off[k].prompt_s[1:]))
                              for k in rounds)
    same = [sum(a == b for a, b in zip(on[k].outputs, off[k].outputs)) for k in rounds]
    start = [sum(a[:4] == b[:4] for a, b in zip(on[k].outputs, off[k].outputs)) for k in rounds]
    n = len(on[rounds[0]].outputs)
    return [
        "| | no cache | cache | x |", "|---|---:|---:|---:|",
        f"| call 1 prompt phase (median) | {statistics.median(off[k].prompt_s[0] for k in rounds):.2f} s | "
        f"{statistics.median(on[k].prompt_s[0] for k in rounds):.2f} s | {first:.2f} |",
        f"| calls 2..n prompt phase (median per call) | "
        f"{statistics.median(x for k in rounds for x in off[k].prompt_s[1:]):.2f} s | "
        f"{statistics.median(x for k in rounds for x in on[k].prompt_s[1:]):.2f} s | {later:.2f} |",
        f"| prompt tokens decoded, calls 2..n (median per call) | "
        f"{statistics.median(x for k in rounds for x in off[k].decoded[1:])} | "
        f"{statistics.median(x for k in rounds for x in on[k].decoded[1:])} | |",
        f"greedy outputs identical with and without the cache: {min(same)}-{max(same)} of {n} "
        f"(first 4 tokens: {min(start)}-{max(start)} of {n})",
    ]


# -- (b') one prompt, then another with the same instruction ---------------------------------------
def bench_repeat(args: argparse.Namespace, model: str) -> List[dict]:
    """The issue's in-process case: a call of one prompt, then a second call whose one
    prompt repeats the first's instruction; the second call's prompt phase, cache on/off."""
    runs = []
    first = f"{INSTRUCTION}Review: {REVIEWS[0]}\nLabel:"
    second = f"{INSTRUCTION}Review: {REVIEWS[1]}\nLabel:"
    for rnd in range(1, args.rounds + 1):
        for cache in ((True, False) if rnd % 2 else (False, True)):
            with pg.Model(model, n_parallel=4, n_ctx=512, n_threads=args.threads, flash_attn=False,
                          prompt_cache=cache) as m:
                pg.generate_parallel(m, "Warm-up.", max_tokens=2, temperature=0)
                a = pg.generate_parallel(m, first, max_tokens=args.max_tokens, temperature=0).stats
                b = pg.generate_parallel(m, second, max_tokens=args.max_tokens, temperature=0).stats
                runs.append(dict(cache=cache, round=rnd, instruction_tokens=len(m.tokenize(INSTRUCTION)),
                                 first_s=a.prompt_seconds, second_s=b.prompt_seconds,
                                 second_decoded=b.prompt_tokens - b.cached_prompt_tokens))
            log(f"(b') round {rnd}: cache {cache}: prompt s {a.prompt_seconds:.3f} then {b.prompt_seconds:.3f}")
    return runs


def report_repeat(runs: List[dict]) -> List[str]:
    on = {r["round"]: r for r in runs if r["cache"]}
    off = {r["round"]: r for r in runs if not r["cache"]}
    rounds = sorted(on)

    def med(d: Dict[int, dict], key: str) -> float:
        return statistics.median(d[k][key] for k in rounds)

    x = statistics.median(off[k]["second_s"] / on[k]["second_s"] for k in rounds)
    return [
        f"instruction: {runs[0]['instruction_tokens']} tokens",
        "| | no cache | cache | x (no cache / cache) |", "|---|---:|---:|---:|",
        f"| call 1 prompt phase (median) | {med(off, 'first_s'):.3f} s | {med(on, 'first_s'):.3f} s | |",
        f"| call 2 prompt phase (median) | {med(off, 'second_s'):.3f} s | {med(on, 'second_s'):.3f} s | {x:.2f} |",
        f"| call 2 / call 1 | {med(off, 'second_s') / med(off, 'first_s'):.2f} | "
        f"{med(on, 'second_s') / med(on, 'first_s'):.2f} | |",
        f"| call 2 prompt tokens decoded | {med(off, 'second_decoded'):.0f} | {med(on, 'second_decoded'):.0f} | |",
    ]


# -- (d) the host tier's save and restore against decoding -----------------------------------------
def bench_crossover(args: argparse.Namespace, model: str) -> List[dict]:
    """One slot (two KV streams): session A of L tokens, then B and C push it out of the
    streams (A is saved to host memory), then A's next turn restores it. Save and restore
    times come from the engine's counters; decoding from A's own first prefill."""
    runs = []
    for length in args.crossover_tokens:
        n_ctx = max(512, 2 * length + 64)
        with pg.Model(model, n_parallel=1, n_ctx=n_ctx, n_threads=args.threads, flash_attn=False,
                      cache_ram=4096) as m:
            pg.generate_parallel(m, "Warm-up.", max_tokens=2, temperature=0)
            texts = [f"Session {k}: " + f"topic {k} matters because of reason {k} and more. " * 400 for k in "ABC"]
            prompts = [m.detokenize(m.tokenize(t)[:length]) for t in texts]

            def counters():
                return m.stats()

            for rnd in range(1, args.rounds + 1):
                c0 = counters()
                first = pg.generate_parallel(m, f"{prompts[0]} ({rnd})", max_tokens=2, temperature=0,
                                             cache_prompt=False).stats
                for p in prompts:
                    pg.generate_parallel(m, p, max_tokens=2, temperature=0)
                for p in prompts[1:]:  # A leaves the streams
                    pg.generate_parallel(m, p + " again", max_tokens=2, temperature=0)
                c1 = counters()
                again = pg.generate_parallel(m, prompts[0] + " Next turn:", max_tokens=2, temperature=0).stats
                c2 = counters()
                saved = c1.host_saved_tokens - c0.host_saved_tokens
                runs.append(dict(tokens=length, round=rnd,
                                 decode_ms_per_1k=1e6 * first.prompt_seconds / max(1, first.prompt_tokens),
                                 save_ms_per_1k=1e6 * (c1.host_save_seconds - c0.host_save_seconds) / max(1, saved),
                                 saves=c1.host_cache_saves - c0.host_cache_saves,
                                 restored=again.host_cached_tokens,
                                 restore_ms=1e3 * (c2.host_restore_seconds - c1.host_restore_seconds),
                                 restore_ms_per_1k=1e6 * (c2.host_restore_seconds - c1.host_restore_seconds)
                                 / max(1, again.host_cached_tokens),
                                 bytes_per_token=c2.host_cache_bytes / max(1, c2.host_tokens_cached)))
                log(f"(d) {length} tokens, round {rnd}: {runs[-1]}")
    return runs


def report_crossover(runs: List[dict]) -> List[str]:
    out = ["| session tokens | decode ms / 1k tokens | save ms / 1k | restore ms / 1k | restore ms | "
           "decode / restore | host bytes / token |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in dict.fromkeys(r["tokens"] for r in runs):
        mine = [r for r in runs if r["tokens"] == length]

        def med(key: str) -> float:
            return statistics.median(r[key] for r in mine)

        out.append(f"| {length} | {med('decode_ms_per_1k'):.0f} | {med('save_ms_per_1k'):.1f} | "
                   f"{med('restore_ms_per_1k'):.1f} | {med('restore_ms'):.2f} | "
                   f"{med('decode_ms_per_1k') / max(1e-9, med('restore_ms_per_1k')):.0f} | "
                   f"{med('bytes_per_token'):.0f} |")
    return out


# -- (c) workloads without reuse -------------------------------------------------------------------
def bench_noreuse(args: argparse.Namespace, model: str) -> List[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            for cache in ((True, False) if rnd % 2 else (False, True)):
                out = os.path.join(tmp, f"r{rnd}-{cache}.json")
                cmd = [sys.executable, "-m", "parallel_gen", "bench", "-m", model, "--workload", "short,ragged",
                       "--prompts", str(args.bench_prompts), "--max-tokens", "64", "--n-parallel", "16",
                       "--threads", str(args.threads), "--flash-attn", "off", "--no-loop", "--no-batched-bench",
                       "--repeat", "1", "--json", out] + ([] if cache else ["--no-prompt-cache"])
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    for row in json.load(f)["results"]:
                        runs.append(dict(workload=row["workload"], variant=row["variant"],
                                         wall_s=row["median"]["wall_s"], cache=cache, round=rnd))
                log(f"(c) round {rnd}: cache {cache} done")
    return runs


def report_noreuse(runs: List[dict]) -> List[str]:
    out = ["| workload / variant | wall, cache (median) | wall, no cache (median) | x (no cache / cache) |",
           "|---|---:|---:|---:|"]
    keys = dict.fromkeys((r["workload"], r["variant"]) for r in runs)
    for w, v in keys:
        mine = [r for r in runs if r["workload"] == w and r["variant"] == v]
        on = {r["round"]: r["wall_s"] for r in mine if r["cache"]}
        off = {r["round"]: r["wall_s"] for r in mine if not r["cache"]}
        ratios = [off[k] / on[k] for k in on if k in off]
        out.append(f"| {w} / {v} | {statistics.median(on.values()):.2f} s | {statistics.median(off.values()):.2f} s | "
                   f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--only", action="append", choices=["chat", "calls", "repeat", "noreuse", "crossover"],
                    help="run only these parts (repeatable; default: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=4, help="(a) concurrent chat sessions = slots")
    ap.add_argument("--turns", type=int, default=6, help="(a) turns per session")
    ap.add_argument("--reply-tokens", type=int, default=32, help="(a) tokens generated per turn")
    ap.add_argument("--slots", type=int, default=0, help="(a) slots of each server (default: --sessions)")
    ap.add_argument("--preamble", action="store_true", help="(a) each session's own ~200 tokens in its first turn")
    ap.add_argument("--system-policies", type=int, default=16, help="(a) system prompt size (16: ~300 tokens)")
    ap.add_argument("--host-tier", action="store_true",
                    help="(a) compare with serve --cache-ram 0 (the build before the host tier) instead of "
                         "--no-prompt-cache")
    ap.add_argument("--crossover-tokens", type=int, nargs="+", default=[64, 256, 1024, 2048],
                    help="(d) session lengths")
    ap.add_argument("--calls", type=int, default=8, help="(b) calls")
    ap.add_argument("--prompts", type=int, default=16, help="(b) prompts per call = slots")
    ap.add_argument("--max-tokens", type=int, default=4, help="(b) tokens generated per prompt")
    ap.add_argument("--bench-prompts", type=int, default=32, help="(c) prompts of each bench workload")
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
                    or str(HERE / "bin" / "llama-server"), help="llama-server binary ((a) skips it if absent)")
    ap.add_argument("--json", default=None, help="write every run to this file")
    args = ap.parse_args()
    model = args.model or str(default_model_path())
    parts = args.only or ["chat", "calls", "repeat", "noreuse"]
    load = [os.getloadavg()]
    results: Dict[str, list] = {}
    report: List[str] = []
    if "chat" in parts:
        runs = bench_chat(args, model)
        results["chat"] = [asdict(r) for r in runs]
        report += [f"(a) {args.sessions} chat sessions x {args.turns} turns, {args.reply_tokens} tokens per reply:",
                   *report_chat(runs), ""]
    if "calls" in parts:
        runs = bench_calls(args, model)
        results["calls"] = [asdict(r) for r in runs]
        report += [f"(b) {args.calls} calls x {args.prompts} prompts sharing an instruction:", *report_calls(runs), ""]
    if "repeat" in parts:
        runs = bench_repeat(args, model)
        results["repeat"] = runs
        report += ["(b') one prompt, then a second call whose one prompt repeats its instruction:",
                   *report_repeat(runs), ""]
    if "crossover" in parts:
        runs = bench_crossover(args, model)
        results["crossover"] = runs
        report += ["(d) the host tier: save / restore against decoding, per 1,000 tokens:",
                   *report_crossover(runs), ""]
    if "noreuse" in parts:
        runs = bench_noreuse(args, model)
        results["noreuse"] = runs
        report += ["(c) no reuse (parallel-gen bench):", *report_noreuse(runs), ""]
    load.append(os.getloadavg())
    report.append(f"load average before {load[0][0]:.2f}, after {load[1][0]:.2f} ({os.cpu_count()} CPUs)")
    print("\n".join(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loadavg": load, "results": results, "report": report}, f, indent=1)


if __name__ == "__main__":
    main()
