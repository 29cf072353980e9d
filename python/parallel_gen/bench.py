"""``parallel-gen bench``: generate_parallel against the llama-cpp-python loop and llama.cpp.

In ONE process, on the same model, prompts and max_tokens (ignore_eos, greedy), each
round runs, per workload:

(a) ``loop``: the loop users write today, ``Llama.create_completion`` once per prompt;
(b) ``parallel``: :func:`parallel_gen.generate_parallel` at every ``--n-parallel``
    (and, for the ``prefix`` workload, ``parallel-noreuse``: the same prompts with the
    shared prefix made unique per prompt, the control for prefix reuse);
(c) ``batched-bench``: llama.cpp's own ``llama-batched-bench`` at the same batch sizes,
    when that binary is found, as the ceiling (``benchmarks/build_batched_bench.sh``).

Rounds alternate (a), (b), (c) so that drift in a shared machine's load hits them all;
the report gives the median over rounds of each figure, and of each per-round ratio.
See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

SCHEMA = "parallel_gen.bench/1"
DEFAULT_N_PARALLEL = (1, 2, 4, 8, 16, 32)
WORKLOADS = ("short", "prefix", "mixed")
MIXED_LENGTHS = (16, 64, 160, 384)  # prompt tokens of the mixed workload, cycled
BATCHED_BENCH = "llama-batched-bench"

# Targets from the issue (2-core CPU, SmolLM2-135M Q4_1, 2 threads, quiet machine);
# reported next to the measured ratios, informative only.
TARGET_GEN_VS_BB = 0.95       # generate_parallel generation t/s / batched-bench TG, B=16 and 32
TARGET_E2E_VS_LOOP_16 = 1.9   # end to end vs the loop, 16 prompts
TARGET_E2E_VS_LOOP_32 = 2.0   # end to end vs the loop, 32 prompts
TARGET_PREFIX_SPEEDUP = 5.0   # prompt-phase time without / with prefix reuse, 32 prompts

# --------------------------------------------------------------------------- prompts

_QUESTIONS = (
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give three tips for learning to code.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis in one paragraph.",
    "Name five animals that live in the Arctic.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet.",
    "Suggest a name for a small coffee shop.",
    "How do vaccines train the immune system?",
    "Write a short poem about autumn leaves.",
    "What is the difference between weather and climate?",
    "List three unusual uses of a paperclip.",
    "Describe a sunset to someone who has never seen one.",
    "Why is the sky blue during the day?",
)
_SUBJECTS = ("The river", "A small robot", "The old library", "Our team", "The mountain village", "A curious cat",
             "The night train", "The city council", "A young painter", "The research station",
             "The lighthouse keeper", "A quiet garden", "The museum guide")
_VERBS = ("carefully studies", "slowly crosses", "quietly remembers", "often visits", "suddenly discovers",
          "patiently builds", "rarely mentions", "happily shares", "never forgets")
_OBJECTS = ("the northern bridge", "an ancient map", "the harvest festival", "a broken clock", "the winter storm",
            "a long list of rules", "the morning market", "a box of letters", "the hidden stairs", "a new recipe",
            "the empty stadium")
_TAILS = ("before sunrise.", "after the long rain.", "with great care.", "for the first time in years.",
          "while everyone is asleep.", "because nobody else will.", "during the spring fair.",
          "without telling anyone.")


def _sentence(k: int) -> str:
    """A deterministic, varied English sentence (moduli are coprime-ish: few repeats)."""
    return (f"{_SUBJECTS[k % len(_SUBJECTS)]} {_VERBS[(7 * k + 3) % len(_VERBS)]} "
            f"{_OBJECTS[(5 * k + 1) % len(_OBJECTS)]} {_TAILS[(3 * k + 2) % len(_TAILS)]}")


def _text_of_tokens(count: Callable[[str], int], head: str, target: int, start: int, tail: str = "") -> str:
    """head + sentences (from sentence #start) + tail, about ``target`` tokens in all."""
    text, k = head, start
    while count(text + tail) < target:
        text += (" " if text and not text.endswith("\n") else "") + _sentence(k)
        k += 1
    return text + tail


@dataclass
class Workload:
    """One set of prompts; ``key`` names it in results (prefix-noreuse: a control run)."""

    name: str
    description: str
    prompts: List[str]
    prompt_tokens: List[int]
    noreuse_prompts: Optional[List[str]] = None       # prefix workload: the control
    noreuse_prompt_tokens: Optional[List[int]] = None

    @property
    def mean_prompt_tokens(self) -> float:
        return statistics.fmean(self.prompt_tokens)

    @property
    def max_prompt_tokens(self) -> int:
        return max(self.prompt_tokens + (self.noreuse_prompt_tokens or []))

    def info(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "description": self.description,
            "prompts": len(self.prompts),
            "prompt_tokens_total": sum(self.prompt_tokens),
            "prompt_tokens_mean": round(self.mean_prompt_tokens, 1),
            "prompt_tokens_min": min(self.prompt_tokens),
            "prompt_tokens_max": max(self.prompt_tokens),
            "example_prompt": self.prompts[0],
        }
        if self.noreuse_prompt_tokens:
            d["noreuse_prompt_tokens_total"] = sum(self.noreuse_prompt_tokens)
            d["noreuse_example_prompt"] = (self.noreuse_prompts or [""])[0]
        return d


def build_workload(name: str, n: int, count: Callable[[str], int], prefix_tokens: int = 300) -> Workload:
    """The prompts of one workload (deterministic), ``count`` giving a text's tokens."""
    def question(i: int) -> str:
        return f"Question {i + 1}: {_QUESTIONS[i % len(_QUESTIONS)]}"

    if name == "short":
        prompts = [f"{question(i)}\nAnswer:" for i in range(n)]
        desc = "independent short prompts (a question each)"
        return Workload(name, desc, prompts, [count(p) for p in prompts])
    if name == "prefix":
        prefix = _text_of_tokens(count, "Reference notes. Read them, then answer the question at the end.\n",
                                 prefix_tokens, 0)
        # Shared: the prefix first. Control (no reuse possible): the same pieces, the
        # question first, so every prompt differs from its first tokens on.
        prompts = [f"{prefix}\n{question(i)}\nAnswer:" for i in range(n)]
        control = [f"{question(i)}\n{prefix}\nAnswer:" for i in range(n)]
        desc = f"prompts sharing a {count(prefix)}-token prefix, then a question each"
        return Workload(name, desc, prompts, [count(p) for p in prompts], control, [count(p) for p in control])
    if name == "mixed":
        prompts = [_text_of_tokens(count, f"Text {i + 1}.", MIXED_LENGTHS[i % len(MIXED_LENGTHS)] - 4, 3 * i,
                                   "\nSummary:") for i in range(n)]
        desc = "mixed prompt lengths (about " + ", ".join(map(str, MIXED_LENGTHS)) + " tokens, cycled)"
        return Workload(name, desc, prompts, [count(p) for p in prompts])
    raise ValueError(f"unknown workload {name!r}")


# --------------------------------------------------------------------------- measurement


class PeakRSS:
    """Peak resident set size of this process during a ``with`` block, in MiB.

    Linux: the kernel's high-water mark (VmHWM in /proc/self/status) is reset to the
    current RSS on entry by writing "5" to /proc/self/clear_refs, and read on exit; so
    the figure is the process's peak during the block. Elsewhere (or if the reset is
    refused) it falls back to ru_maxrss, the peak of the whole process so far.
    """

    def __enter__(self) -> "PeakRSS":
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if self._vmhwm_kib() is not None:
                self.method = "VmHWM"
        except OSError:
            pass
        self.mib: Optional[float] = None
        return self

    @staticmethod
    def _vmhwm_kib() -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
            return int(m.group(1)) if m else None
        except OSError:
            return None

    def __exit__(self, *exc: Any) -> None:
        kib = self._vmhwm_kib() if self.method == "VmHWM" else None
        if kib is None:
            kib = _ru_maxrss_kib(resource.getrusage(resource.RUSAGE_SELF))
        self.mib = kib / 1024.0


def _ru_maxrss_kib(ru: Any) -> int:
    return int(ru.ru_maxrss // 1024 if sys.platform == "darwin" else ru.ru_maxrss)  # bytes on macOS


@contextlib.contextmanager
def _flash_attn_auto() -> Iterator[None]:
    """Lets ``Llama(flash_attn=False)`` ask for llama.cpp's automatic choice instead.

    llama-cpp-python's Llama only takes a bool (enabled/disabled); for --flash-attn auto
    the constant it reads for "disabled" is swapped for "auto" during construction.
    """
    from llama_cpp import llama_cpp as lc

    saved = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    lc.LLAMA_FLASH_ATTN_TYPE_DISABLED = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    try:
        yield
    finally:
        lc.LLAMA_FLASH_ATTN_TYPE_DISABLED = saved


def open_llama(path: str, n_ctx: int, threads: int, flash_attn: str, n_gpu_layers: int = 0) -> Any:
    """The llama_cpp.Llama of the loop; generate_parallel borrows its weights (and so its
    GPU offload: a Model's KV lives where the Llama put each layer)."""
    import llama_cpp

    kwargs = dict(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                  n_threads_batch=threads, n_gpu_layers=n_gpu_layers, seed=0, verbose=False)
    if flash_attn == "auto":
        with _flash_attn_auto():
            return llama_cpp.Llama(flash_attn=False, **kwargs)
    return llama_cpp.Llama(flash_attn=(flash_attn == "on"), **kwargs)


def _eog_tokens(llm: Any) -> List[int]:
    """Every end-of-generation token of the Llama's vocabulary (to ban them in the loop)."""
    import llama_cpp

    try:
        vocab = llm._model.vocab
        return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    except Exception:  # private API moved: the EOS token at least
        return [llm.token_eos()]


def run_loop(llm: Any, prompts: List[str], max_tokens: int, samples: int, ban: Dict[int, float]) -> Dict[str, Any]:
    """(a) one create_completion per prompt (per sample), greedy, EOG tokens banned."""
    llm.reset()  # start cold: no prompt left cached from a previous run
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        completion_tokens = prompt_tokens = short = 0
        for p in prompts:
            for _ in range(samples):
                r = llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                          logit_bias=ban)
                completion_tokens += r["usage"]["completion_tokens"]
                prompt_tokens += r["usage"]["prompt_tokens"]
                short += r["choices"][0]["finish_reason"] != "length"
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "gen_tps": completion_tokens / wall, "prompt_tps": None, "e2e_tps": completion_tokens / wall,
        "prompt_s": None, "gen_s": None, "peak_rss_mib": rss.mib, "incomplete": short,
    }


def sampling_params(max_tokens: int, samples: int) -> Any:
    import parallel_gen as pg

    kw: Dict[str, Any] = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0)
    if samples > 1:
        if "n" not in {f.name for f in dataclasses.fields(pg.SamplingParams)}:
            raise SystemExit("parallel-gen bench: --samples > 1 needs SamplingParams.n, which this "
                             "parallel_gen does not have")
        kw["n"] = samples
    return pg.SamplingParams(**kw)


def run_parallel(llm: Any, prompts: List[str], n_parallel: int, n_ctx: int, threads: int, flash_attn: str,
                 params: Any) -> Dict[str, Any]:
    """(b) generate_parallel on a Model sharing the Llama's weights, at n_parallel slots.

    The Model is created (and warmed up with a two-token call) outside the timed part, as
    the Llama is for the loop; its memory is inside the peak RSS figure.
    """
    import parallel_gen as pg

    fa = {"auto": "auto", "on": True, "off": False}[flash_attn]
    with PeakRSS() as rss:
        model = pg.Model.from_llama(llm, n_parallel=n_parallel, n_ctx=n_ctx, n_threads=threads, flash_attn=fa)
        try:
            pg.generate_parallel(model, "Warm-up.", max_tokens=2, temperature=0.0, ignore_eos=True)
            t0 = time.perf_counter()
            res = pg.generate_parallel(model, prompts, params)
            wall = time.perf_counter() - t0
        finally:
            model.close()
    s = res.stats
    incomplete = sum(1 for c in res for o in c.outputs if o.finish_reason != "length")
    return {
        "wall_s": wall, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "gen_tps": s.generation_tokens_per_second or None, "prompt_tps": s.prompt_tokens_per_second or None,
        "e2e_tps": s.completion_tokens / wall, "prompt_s": s.prompt_seconds, "gen_s": s.generation_seconds,
        "peak_rss_mib": rss.mib, "incomplete": incomplete,
        "decode_calls": s.decode_calls, "failed": s.failed,
        "prefix_tokens_reused": getattr(s, "prefix_tokens_reused", 0),
    }


def batched_bench_ctx(pp: int, tg: int, n_parallel: int) -> int:
    """-c for llama-batched-bench: every one of B non-unified streams holds pp + tg."""
    return n_parallel * (pp + tg)


def batched_bench_command(exe: str, model: str, pp: int, tg: int, n_parallel: int, threads: int,
                          flash_attn: str, n_gpu_layers: int = 0) -> List[str]:
    return [exe, "-m", model, "-c", str(batched_bench_ctx(pp, tg, n_parallel)), "-b", "2048", "-ub", "512",
            "-npp", str(pp), "-ntg", str(tg), "-npl", str(n_parallel), "-t", str(threads), "-tb", str(threads),
            "-ngl", str(n_gpu_layers), "-fa", flash_attn, "-no-kvu", "--output-format", "jsonl"]


def _proc_vmhwm_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def run_batched_bench(cmd: List[str], timeout: float = 1800.0) -> Dict[str, Any]:
    """(c) one llama-batched-bench process (one batch size); its jsonl row and peak RSS.

    The peak RSS is the child's VmHWM, sampled every 20 ms while it runs (its last value
    is the peak up to then; a new process image starts its own). wait4's ru_maxrss is
    only a fallback: on Linux it carries the RSS of this (large) parent across fork+exec.
    """
    hwm: Optional[int] = None
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            kib = _proc_vmhwm_kib(p.pid)  # before wait4: the process is still there to read
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if kib is not None:
                hwm = kib
            if time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = -9
                raise RuntimeError(f"llama-batched-bench timed out after {timeout:.0f} s")
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    if p.returncode != 0 or not rows:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise RuntimeError(f"llama-batched-bench exited with {p.returncode} and gave no result:\n{tail}")
    r = rows[-1]
    pl, pp, tg = int(r["pl"]), int(r["pp"]), int(r["tg"])
    return {
        "wall_s": float(r["t"]), "prompt_tokens": pl * pp, "completion_tokens": pl * tg,
        "gen_tps": float(r["speed_tg"]), "prompt_tps": float(r["speed_pp"]), "e2e_tps": pl * tg / float(r["t"]),
        "prompt_s": float(r["t_pp"]), "gen_s": float(r["t_tg"]),
        "peak_rss_mib": (hwm if hwm is not None else _ru_maxrss_kib(ru)) / 1024.0, "incomplete": 0, "raw": r,
    }


def find_batched_bench(explicit: Optional[str]) -> Optional[str]:
    """--batched-bench PATH, else llama-batched-bench on PATH or in benchmarks/bin/."""
    if explicit:
        p = shutil.which(explicit) or (explicit if os.path.isfile(explicit) else None)
        if p is None or not os.access(p, os.X_OK):
            raise SystemExit(f"parallel-gen bench: --batched-bench {explicit}: no such executable")
        return os.path.abspath(p)
    found = shutil.which(BATCHED_BENCH)
    if found:
        return found
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "benchmarks" / "bin", Path.cwd() / "benchmarks" / "bin"):
        p = base / BATCHED_BENCH
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


# --------------------------------------------------------------------------- aggregation

METRICS = ("wall_s", "gen_tps", "prompt_tps", "e2e_tps", "prompt_s", "gen_s", "peak_rss_mib",
           "prompt_tokens", "completion_tokens", "incomplete", "decode_calls", "prefix_tokens_reused")
IMPL_ORDER = {"loop": 0, "parallel": 1, "parallel-noreuse": 2, "batched-bench": 3}


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def aggregate(runs: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Median figures per (workload, impl, n_parallel) and medians of per-round ratios.

    x_loop: end-to-end t/s over the loop's in the same round and workload.
    x_bb: generation t/s over llama-batched-bench TG at the same B (B=1 for the loop).
    """
    by_round: Dict[Tuple[str, int, str, Optional[int]], Dict[str, Any]] = {}
    for r in runs:
        if "error" not in r:
            by_round[(r["workload"], r["round"], r["impl"], r["n_parallel"])] = r
    for (wl, rnd, impl, b), r in by_round.items():
        loop = by_round.get((wl, rnd, "loop", None))
        bb = by_round.get((wl, rnd, "batched-bench", 1 if impl == "loop" else b))
        r["x_loop"] = _ratio(r["e2e_tps"], loop["e2e_tps"]) if loop else None
        r["x_bb"] = _ratio(r["gen_tps"], bb["gen_tps"]) if bb else None
        if impl == "parallel-noreuse":
            shared = by_round.get((wl, rnd, "parallel", b))
            r["prefix_prompt_speedup"] = _ratio(r["prompt_s"], shared["prompt_s"]) if shared else None

    groups: Dict[Tuple[str, str, Optional[int]], List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["impl"], r["n_parallel"]), []).append(r)
    results = []
    for (wl, impl, b), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        med = {m: _median([r.get(m) for r in ok]) for m in METRICS}
        res = {
            "workload": wl, "impl": impl, "n_parallel": b, "rounds_ok": len(ok), "median": med,
            "x_loop": _median([r.get("x_loop") for r in ok]), "x_bb": _median([r.get("x_bb") for r in ok]),
            "rounds": rs,
        }
        if impl == "parallel-noreuse":
            res["prefix_prompt_speedup"] = _median([r.get("prefix_prompt_speedup") for r in ok])
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            res["errors"] = errors
        results.append(res)
    wl_order = {w: i for i, w in enumerate(WORKLOADS)}
    results.sort(key=lambda r: (wl_order.get(r["workload"], 99), IMPL_ORDER[r["impl"]], r["n_parallel"] or 0))
    return results, summarize(results)


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    def get(wl: str, impl: str, b: Optional[int]) -> Optional[Dict[str, Any]]:
        return next((r for r in results if (r["workload"], r["impl"], r["n_parallel"]) == (wl, impl, b)), None)

    summary: Dict[str, Any] = {"workloads": {}, "targets": []}
    for wl in sorted({r["workload"] for r in results}, key=lambda w: WORKLOADS.index(w) if w in WORKLOADS else 99):
        par = [r for r in results if r["workload"] == wl and r["impl"] == "parallel" and r["x_loop"] is not None]
        d: Dict[str, Any] = {}
        if par:
            best = max(par, key=lambda r: r["x_loop"])
            d["best_x_loop"] = best["x_loop"]
            d["best_x_loop_n_parallel"] = best["n_parallel"]
        d["x_bb"] = {str(r["n_parallel"]): r["x_bb"] for r in results
                     if r["workload"] == wl and r["impl"] == "parallel" and r["x_bb"] is not None}
        ctl = {str(r["n_parallel"]): r.get("prefix_prompt_speedup") for r in results
               if r["workload"] == wl and r["impl"] == "parallel-noreuse"}
        if ctl:
            d["prefix_prompt_speedup"] = ctl
        summary["workloads"][wl] = d

    def target(name: str, value: Optional[float], goal: float, note: str) -> None:
        if value is not None:
            summary["targets"].append({"name": name, "value": value, "target": goal, "met": value >= goal,
                                       "note": note})

    for b in (16, 32):
        r = get("short", "parallel", b)
        if r:
            target(f"gen_vs_batched_bench_B{b}", r["x_bb"], TARGET_GEN_VS_BB,
                   f"short workload: generation t/s / llama-batched-bench TG at B={b}")
    short = [r for r in results if r["workload"] == "short" and r["impl"] == "parallel" and r["x_loop"] is not None]
    prompts = short[0]["rounds"][0].get("prompts", 0) if short else 0
    if prompts >= 16:  # the targets are for 16 and 32 prompts (x 128 tokens)
        best = max(short, key=lambda r: r["x_loop"])
        goal = TARGET_E2E_VS_LOOP_32 if prompts >= 32 else TARGET_E2E_VS_LOOP_16
        target(f"e2e_vs_loop_{prompts}_prompts", best["x_loop"], goal,
               f"short workload, best n_parallel ({best['n_parallel']}): end-to-end t/s / the loop's "
               "(targets: 1.9x at 16 prompts, 2.0x at 32, 128 tokens each)")
    ctl = [r for r in results if r["impl"] == "parallel-noreuse" and r.get("prefix_prompt_speedup") is not None]
    if ctl and ctl[0]["rounds"][0].get("prompts", 0) >= 32:  # the target is for 32 prompts
        top = max(ctl, key=lambda r: r["n_parallel"])
        target(f"prefix_prompt_speedup_B{top['n_parallel']}", top["prefix_prompt_speedup"], TARGET_PREFIX_SPEEDUP,
               "prefix workload: prompt-phase seconds without / with prefix reuse")
    return summary


# --------------------------------------------------------------------------- output


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: List[Dict[str, Any]]) -> str:
    head = ("workload", "impl", "B", "gen t/s", "prompt t/s", "e2e t/s", "wall s", "peak RSS MiB", "x loop", "x bb")
    rows = [head]
    for r in results:
        m = r["median"]
        rows.append((
            r["workload"], r["impl"], "-" if r["n_parallel"] is None else str(r["n_parallel"]),
            _fmt(m["gen_tps"], ".1f"), _fmt(m["prompt_tps"], ".1f"), _fmt(m["e2e_tps"], ".1f"),
            _fmt(m["wall_s"], ".2f"), _fmt(m["peak_rss_mib"], ".0f"), _fmt(r["x_loop"], ".2f"),
            _fmt(r["x_bb"], ".2f") + (" !" if r.get("errors") else ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(results: List[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    lines = []
    for r in results:
        if r["impl"] == "parallel-noreuse":
            shared = next((x for x in results if x["workload"] == r["workload"] and x["impl"] == "parallel"
                           and x["n_parallel"] == r["n_parallel"]), None)
            reused = shared["median"]["prefix_tokens_reused"] if shared else None
            lines.append(f"prefix reuse, B={r['n_parallel']}: prompt phase {_fmt(r['prefix_prompt_speedup'], '.2f')}x "
                         f"faster than without reuse (prefix_tokens_reused {_fmt(reused, '.0f')}, "
                         f"{_fmt(r['median']['prefix_tokens_reused'], '.0f')} in the control)")
    for t in summary["targets"]:
        lines.append(f"target {t['name']}: {t['value']:.2f} (target >= {t['target']}: "
                     f"{'met' if t['met'] else 'not met'}) - {t['note']}")
    for r in results:
        for e in r.get("errors", []):
            lines.append(f"error in {r['workload']}/{r['impl']}/B={r['n_parallel']}: {e.splitlines()[0]}")
        inc = r["median"].get("incomplete")
        if inc:
            lines.append(f"warning: {r['workload']}/{r['impl']}/B={r['n_parallel']}: {inc:.0f} completions "
                         "ended before max_tokens")
    return "\n".join(lines)


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("parallel-gen bench: --plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install 'parallel_gen[plot]')") from None


def write_plot(path: str, results: List[Dict[str, Any]], config: Dict[str, Any]) -> None:
    """Throughput against n_parallel, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in WORKLOADS if any(r["workload"] == w for r in results)]
    fig, axes = plt.subplots(1, len(wls), figsize=(5.6 * len(wls), 4.4), squeeze=False)
    series = (
        ("parallel", "gen_tps", "o-", "C0", "generate_parallel: generation t/s"),
        ("parallel", "e2e_tps", "s--", "C1", "generate_parallel: end to end t/s"),
        ("parallel-noreuse", "e2e_tps", "^:", "C3", "same, no prefix reuse: end to end t/s"),
        ("batched-bench", "gen_tps", "d-", "C2", "llama-batched-bench: TG t/s"),
    )
    for ax, wl in zip(axes[0], wls):
        bs: set = set()
        for impl, metric, style, color, label in series:
            pts = sorted((r["n_parallel"], r["median"][metric]) for r in results
                         if r["workload"] == wl and r["impl"] == impl and r["median"].get(metric))
            if pts:
                bs.update(b for b, _ in pts)
                ax.plot([b for b, _ in pts], [v for _, v in pts], style, color=color, label=label)
        loop = next((r for r in results if r["workload"] == wl and r["impl"] == "loop"), None)
        if loop and loop["median"].get("e2e_tps"):
            ax.axhline(loop["median"]["e2e_tps"], color="gray", ls="--", label="llama-cpp-python loop (end to end)")
        if bs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(bs))
            ax.set_xticklabels([str(b) for b in sorted(bs)])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("n_parallel (B)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{wl}: {config['prompts']} prompts x {config['max_tokens']} tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(config['model'])}, {config['threads']} thread(s), "
                 f"flash_attn {config['flash_attn']}, median of {config['repeat']} round(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def _n_parallel_list(text: str) -> List[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"n_parallel values must be >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command."""
    import llama_cpp

    import parallel_gen as pg
    from parallel_gen.model import _cpu_threads
    from parallel_gen.models import default_model_path

    if args.plot:
        check_matplotlib()
    for opt, path in (("--json", args.json), ("--plot", args.plot)):  # fail now, not after the run
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"parallel-gen bench: {opt} {path}: no such directory")
    from parallel_gen._native import _core

    limit = int(_core.max_parallel_sequences())
    if args.n_parallel[-1] > limit:
        raise SystemExit(f"parallel-gen bench: n_parallel {args.n_parallel[-1]} is above llama.cpp's limit of "
                         f"{limit} sequences")
    model_path = os.path.abspath(os.fspath(args.model or default_model_path()))
    if not os.path.isfile(model_path):
        raise FileNotFoundError(2, "model file not found", model_path)
    threads = args.threads or _cpu_threads()
    bb_exe = None if args.no_batched_bench else find_batched_bench(args.batched_bench)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    sequences = args.prompts * args.samples
    n_parallel = [b for b in args.n_parallel if b <= sequences]
    skipped = [b for b in args.n_parallel if b > sequences]
    if not n_parallel:
        raise SystemExit(f"parallel-gen bench: every --n-parallel value exceeds the {sequences} sequences to run")
    if skipped:
        _log(f"note: n_parallel {','.join(map(str, skipped))} skipped: only {sequences} sequences "
             f"(raise --prompts to measure them)")
    params = sampling_params(args.max_tokens, args.samples)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    # One Llama for the loop, its weights shared with every generate_parallel Model. Its
    # context fits the longest prompt any workload builds (checked below) + max_tokens.
    longest = max(MIXED_LENGTHS[-1], args.prefix_tokens) + 64
    llm = open_llama(model_path, _round_up(longest + args.max_tokens + 8, 256), threads, args.flash_attn,
                     args.n_gpu_layers)

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    workloads = [build_workload(n, args.prompts, count, args.prefix_tokens) for n in names]
    for w in workloads:
        if w.max_prompt_tokens + args.max_tokens > llm.n_ctx():
            raise SystemExit(f"parallel-gen bench: internal error: workload {w.name} needs "
                             f"{w.max_prompt_tokens + args.max_tokens} > {llm.n_ctx()} tokens of context")
    n_ctx_seq = {w.name: _round_up(w.max_prompt_tokens + args.max_tokens + 8, 64) for w in workloads}
    ban = {t: float("-inf") for t in _eog_tokens(llm)}
    llm.create_completion("Warm-up.", max_tokens=4, temperature=0.0)  # page the weights in

    config = {
        "model": model_path, "model_bytes": os.path.getsize(model_path), "prompts": args.prompts,
        "samples": args.samples, "max_tokens": args.max_tokens, "n_parallel": n_parallel,
        "n_parallel_skipped": skipped, "workloads": names, "threads": threads, "flash_attn": args.flash_attn,
        "n_gpu_layers": args.n_gpu_layers, "backends": list(_core.backends()),
        "repeat": args.repeat, "prefix_tokens": args.prefix_tokens, "loop": not args.no_loop,
        "batched_bench": bb_exe, "n_ctx_llama": llm.n_ctx(), "n_ctx_per_sequence": n_ctx_seq,
        "sampling": {"temperature": 0.0, "ignore_eos": True, "loop_ignore_eos": "logit_bias -inf on EOG tokens"},
        "rss_method": None,
        "versions": {"parallel_gen": pg.__version__, "llama_cpp_python": llama_cpp.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(), "cpus": os.cpu_count(), "cpus_usable": _cpu_threads(),
        "loadavg_start": load_start,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with PeakRSS() as probe:
        pass
    config["rss_method"] = probe.method
    _log(f"bench: {os.path.basename(model_path)}, {args.prompts} prompts x {args.max_tokens} tokens, "
         f"n_parallel {n_parallel}, {threads} thread(s), flash_attn {args.flash_attn}, {args.repeat} round(s), "
         f"batched-bench: {bb_exe or 'not used'}")

    runs: List[Dict[str, Any]] = []

    def record(wl: Workload, rnd: int, impl: str, b: Optional[int], fn: Callable[[], Dict[str, Any]]) -> None:
        rec: Dict[str, Any] = {"workload": wl.name, "round": rnd, "impl": impl, "n_parallel": b,
                               "prompts": args.prompts}
        try:
            rec.update(fn())
            _log(f"  [{rnd + 1}/{args.repeat}] {wl.name:6s} {impl:16s} B={'-' if b is None else b:>3}: "
                 f"{rec['wall_s']:7.2f} s, gen {_fmt(rec['gen_tps'], '.1f')} t/s, e2e {rec['e2e_tps']:.1f} t/s")
        except (RuntimeError, OSError, pg.ModelLoadError) as e:  # one configuration failed: keep going
            rec["error"] = str(e)
            _log(f"  [{rnd + 1}/{args.repeat}] {wl.name} {impl} B={b}: ERROR {str(e).splitlines()[0]}")
        runs.append(rec)

    config["interrupted"] = False
    try:
        for wl in workloads:
            _log(f"workload {wl.name}: {wl.description}; prompt tokens mean {wl.mean_prompt_tokens:.1f}")
            pp = max(1, round(wl.mean_prompt_tokens))
            for rnd in range(args.repeat):
                if not args.no_loop:
                    record(wl, rnd, "loop", None,
                           lambda: run_loop(llm, wl.prompts, args.max_tokens, args.samples, ban))
                for b in n_parallel:
                    record(wl, rnd, "parallel", b,
                           lambda: run_parallel(llm, wl.prompts, b, n_ctx_seq[wl.name], threads, args.flash_attn,
                                                params))
                if wl.noreuse_prompts:
                    for b in n_parallel:
                        record(wl, rnd, "parallel-noreuse", b,
                               lambda: run_parallel(llm, wl.noreuse_prompts, b, n_ctx_seq[wl.name], threads,
                                                    args.flash_attn, params))
                if bb_exe:
                    for b in n_parallel:
                        cmd = batched_bench_command(bb_exe, model_path, pp, args.max_tokens, b, threads,
                                                    args.flash_attn, args.n_gpu_layers)
                        record(wl, rnd, "batched-bench", b, lambda: run_batched_bench(cmd))
    except KeyboardInterrupt:  # report what was measured so far
        config["interrupted"] = True
        _log("interrupted: reporting the measurements taken so far")
        if not runs:
            raise
    llm.close()

    results, summary = aggregate(runs)
    config["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = format_table(results)
    notes = format_summary(results, summary)
    print()
    print(f"{os.path.basename(model_path)}: {args.prompts} prompts x {args.max_tokens} tokens (ignore_eos, greedy), "
          f"{threads} thread(s), flash_attn {args.flash_attn}; median of {args.repeat} round(s); "
          f"load average {_fmt(load_start[0] if load_start else None, '.2f')} -> "
          f"{_fmt(config['loadavg_end'][0] if config['loadavg_end'] else None, '.2f')}")
    print(table)
    if notes:
        print()
        print(notes)
    print("\nFigures are ratios: absolute times on a shared machine are not stable.")
    if args.json:
        doc = {"schema": SCHEMA, "config": config, "workloads": {w.name: w.info() for w in workloads},
               "results": results, "summary": summary, "table": table}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        _log(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, config)
        _log(f"wrote {args.plot}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: parallel_gen.models.default_model_path())")
    p.add_argument("--prompts", type=_positive, default=16, metavar="N", help="prompts per workload (default 16)")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--n-parallel", type=_n_parallel_list, default=list(DEFAULT_N_PARALLEL), metavar="LIST",
                   help="comma-separated n_parallel values (default 1,2,4,8,16,32); values above the "
                        "number of sequences are skipped")
    p.add_argument("--workload", choices=("short", "prefix", "mixed", "all"), default="all",
                   help="short: independent short prompts; prefix: prompts sharing a ~300-token prefix "
                        "(plus its no-reuse control); mixed: mixed prompt lengths (default all)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"), default="off",
                   help="flash attention everywhere (default off, llama-cpp-python's Llama default)")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers offloaded to the GPU everywhere (the Llama, hence the Models that share its "
                        "weights, and batched-bench's -ngl); -1: all. Needs a GPU build of llama-cpp-python "
                        "(default 0)")
    p.add_argument("--repeat", type=_positive, default=3, metavar="R",
                   help="alternating rounds; medians are reported (default 3)")
    p.add_argument("--batched-bench", metavar="PATH",
                   help="llama-batched-bench executable (default: on PATH, or benchmarks/bin/)")
    p.add_argument("--no-batched-bench", action="store_true", help="do not run llama-batched-bench")
    p.add_argument("--no-loop", action="store_true", help="do not run the llama-cpp-python loop")
    p.add_argument("--prefix-tokens", type=_positive, default=300, help="shared prefix length (default 300)")
    p.add_argument("--samples", type=_positive, default=1, metavar="K",
                   help="completions per prompt (SamplingParams.n; the loop runs each prompt K times)")
    p.add_argument("--json", metavar="FILE", help="write every measurement, medians and ratios as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of throughput against n_parallel (needs matplotlib)")


DESCRIPTION = ("Benchmark generate_parallel against the llama-cpp-python loop (Llama.create_completion per "
               "prompt) and llama.cpp's llama-batched-bench, in one process, alternating rounds.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers the ``bench`` subcommand on the parallel-gen command line."""
    p = subparsers.add_parser("bench", help="benchmark generate_parallel against the llama-cpp-python loop",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="parallel-gen bench", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except FileNotFoundError as e:
        print(f"parallel-gen bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
