"""The implementations the bench times, behind one interface: run(variant, n_parallel)
returns a Measurement.

- ``loop``: the loop users write with llama-cpp-python, ``Llama.create_completion`` per
  prompt (per sample), greedy, end-of-generation tokens banned;
- ``parallel``: :func:`parallel_gen.generate_parallel`, one call, on a Model sharing the
  loop's weights;
- ``callers``: the same prompts split among several threads, each calling
  generate_parallel on one shared Model (their sequences join one running batch);
- ``batched-bench``: llama.cpp's own ``llama-batched-bench``, a subprocess, the ceiling.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import parallel_gen as pg

from .measure import PeakRSS, ru_maxrss_kib, vmhwm_kib
from .records import Measurement
from .workloads import BATCHED_BENCH, CALLERS, LOOP, PARALLEL, Variant, variant_params

BATCHED_BENCH_EXE = "llama-batched-bench"
BATCHED_BENCH_ENV = "PARALLEL_GEN_BATCHED_BENCH"
# The source tree's build output (benchmarks/build_batched_bench.sh), when running from a checkout.
SOURCE_TREE_BIN = Path(__file__).resolve().parents[3] / "benchmarks" / "bin"


@dataclass(frozen=True)
class Settings:
    """What every implementation shares in a bench run."""

    model_path: str
    threads: int
    flash_attn: str
    """"off", "on" or "auto"."""
    n_gpu_layers: int
    samples: int
    callers: int
    repack: bool
    """Weights in llama.cpp's extra buffer types (parallel_gen.repack), everywhere."""
    prompt_cache: bool = True
    """Model(prompt_cache=...) of every generate_parallel run."""


class Implementation(abc.ABC):
    """One way of running a variant's requests; ``name`` identifies it in the results."""

    name: str

    @abc.abstractmethod
    def run(self, variant: Variant, n_parallel: Optional[int]) -> Measurement:
        """Runs every request of ``variant`` once (timed) and says what it took."""


# --------------------------------------------------------------------------- the Llama

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


def open_llama(settings: Settings, n_ctx: int) -> Any:
    """The llama_cpp.Llama of the loop; generate_parallel borrows its weights (and so its
    GPU offload and weight repacking: a Model's KV lives where the Llama put each layer)."""
    kwargs = dict(model_path=settings.model_path, repack=settings.repack, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                  n_threads=settings.threads, n_threads_batch=settings.threads, n_gpu_layers=settings.n_gpu_layers,
                  seed=0, verbose=False)
    if settings.flash_attn == "auto":
        with _flash_attn_auto():
            return pg.load_llama(flash_attn=False, **kwargs)
    return pg.load_llama(flash_attn=(settings.flash_attn == "on"), **kwargs)


def _eog_tokens(llm: Any) -> List[int]:
    """Every end-of-generation token of the Llama's vocabulary (to ban them in the loop)."""
    import llama_cpp

    vocab = llm._model.vocab
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


# --------------------------------------------------------------------------- (a) the loop

class LlamaLoop(Implementation):
    """One create_completion per prompt (per sample), greedy, EOG tokens banned."""

    name = LOOP

    def __init__(self, llm: Any, settings: Settings) -> None:
        self.llm = llm
        self.samples = settings.samples
        self.ban = {t: float("-inf") for t in _eog_tokens(llm)}

    def run(self, variant: Variant, n_parallel: Optional[int]) -> Measurement:
        self.llm.reset()  # start cold: no prompt left cached from a previous run
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            completion_tokens = prompt_tokens = short = 0
            for p, max_tokens in zip(variant.prompts, variant.max_tokens):
                for _ in range(self.samples):
                    r = self.llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                                   logit_bias=self.ban)
                    completion_tokens += r["usage"]["completion_tokens"]
                    prompt_tokens += r["usage"]["prompt_tokens"]
                    short += r["choices"][0]["finish_reason"] != "length"
            wall = time.perf_counter() - t0
        return Measurement(wall_s=wall, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           e2e_tps=completion_tokens / wall, gen_tps=completion_tokens / wall, peak_rss_mib=rss.mib,
                           incomplete=short)


# --------------------------------------------------------------------------- (b) generate_parallel

def _params(variant: Variant, samples: int) -> Any:
    """One SamplingParams for the call, or one per prompt when their max_tokens differ."""
    if len(set(variant.max_tokens)) == 1:
        return pg.SamplingParams(**variant_params(variant, samples))
    return [pg.SamplingParams(**variant_params(variant, samples, i)) for i in range(len(variant.prompts))]


def _outcome(variant: Variant, results: Sequence[pg.BatchResult]) -> Dict[str, int]:
    """Outputs short of their max_tokens (where that is unexpected) and passing the check."""
    outputs = [o for res in results for c in res for o in c.outputs]
    out = {"incomplete": sum(o.finish_reason != "length" for o in outputs) if variant.full_length else 0}
    if variant.check is not None:
        complete = [o for o in outputs if o.finish_reason == "stop"]
        out["complete"] = len(complete)
        out["passed_check"] = sum(bool(variant.check(o.text)) for o in complete)
    return out


class _OnModel(Implementation):
    """A fresh Model sharing the Llama's weights for each run, created and warmed up
    outside the timed part (as the Llama is for the loop); its memory is in the peak RSS."""

    def __init__(self, llm: Any, settings: Settings) -> None:
        self.llm = llm
        self.settings = settings

    def run(self, variant: Variant, n_parallel: Optional[int]) -> Measurement:
        s = self.settings
        fa = {"auto": "auto", "on": True, "off": False}[s.flash_attn]
        with PeakRSS() as rss:
            model = pg.Model.from_llama(self.llm, n_parallel=n_parallel, n_ctx=variant.n_ctx,
                                        n_threads=s.threads, flash_attn=fa, repack=s.repack,
                                        prompt_cache=s.prompt_cache)
            try:
                pg.generate_parallel(model, "Warm-up.", max_tokens=2, temperature=0.0, ignore_eos=True)
                params = _params(variant, s.samples)
                t0 = time.perf_counter()
                results = self.timed(model, variant, params)
                wall = time.perf_counter() - t0
            finally:
                model.close()
        return self.measurement(variant, results, wall, rss.mib)

    @abc.abstractmethod
    def timed(self, model: pg.Model, variant: Variant, params: Any) -> List[pg.BatchResult]:
        """The timed part: every request of the variant on ``model``."""

    def measurement(self, variant: Variant, results: List[pg.BatchResult], wall: float,
                    rss_mib: Optional[float]) -> Measurement:
        completion = sum(r.stats.completion_tokens for r in results)
        if len(results) == 1:
            st = results[0].stats
            rates = dict(gen_tps=st.generation_tokens_per_second or None,
                         prompt_tps=st.prompt_tokens_per_second or None, prompt_s=st.prompt_seconds,
                         gen_s=st.generation_seconds, decode_calls=st.decode_calls,
                         host_ms_step=st.host_ms_per_step,
                         prefix_tokens_reused=st.prefix_tokens_reused, sequence_moves=st.sequence_moves)
        else:  # concurrent calls share decode steps: their per-call figures overlap
            rates = {}
        return Measurement(wall_s=wall, prompt_tokens=sum(r.stats.prompt_tokens for r in results),
                           completion_tokens=completion, e2e_tps=completion / wall, peak_rss_mib=rss_mib,
                           failed=sum(r.stats.failed for r in results), **rates, **_outcome(variant, results))


class GenerateParallel(_OnModel):
    """(b) one generate_parallel call with every prompt, at n_parallel slots."""

    name = PARALLEL

    def timed(self, model: pg.Model, variant: Variant, params: Any) -> List[pg.BatchResult]:
        return [pg.generate_parallel(model, variant.prompts, params)]


class ConcurrentCallers(_OnModel):
    """The prompts split among ``callers`` threads, each calling generate_parallel on the
    one Model at the same time."""

    name = CALLERS

    def timed(self, model: pg.Model, variant: Variant, params: Any) -> List[pg.BatchResult]:
        k = max(1, min(self.settings.callers, len(variant.prompts)))
        chunks = [list(range(len(variant.prompts)))[i::k] for i in range(k)]
        results: List[Optional[pg.BatchResult]] = [None] * k
        errors: List[BaseException] = []

        def caller(j: int) -> None:
            mine = [variant.prompts[i] for i in chunks[j]]
            p = [params[i] for i in chunks[j]] if isinstance(params, list) else params
            try:
                results[j] = pg.generate_parallel(model, mine, p)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(j,)) for j in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]


# --------------------------------------------------------------------------- (c) llama-batched-bench

class BatchedBenchNotFound(FileNotFoundError):
    """llama-batched-bench was not found where the bench looks for it."""


def find_batched_bench(explicit: Optional[str] = None) -> str:
    """The llama-batched-bench executable: ``explicit`` (the --batched-bench flag), else
    $PARALLEL_GEN_BATCHED_BENCH, else on PATH, else the source tree's benchmarks/bin/.

    Raises BatchedBenchNotFound naming every place looked at.
    """
    for given, what in ((explicit, "--batched-bench"), (os.environ.get(BATCHED_BENCH_ENV), BATCHED_BENCH_ENV)):
        if given:  # named: it must be there, no falling back to a different binary
            p = shutil.which(given) or (given if os.path.isfile(given) else None)
            if p is None or not os.access(p, os.X_OK):
                raise BatchedBenchNotFound(f"{what} {given}: no such executable")
            return os.path.abspath(p)
    found = shutil.which(BATCHED_BENCH_EXE)
    if found:
        return os.path.abspath(found)
    p = SOURCE_TREE_BIN / BATCHED_BENCH_EXE
    if p.is_file() and os.access(p, os.X_OK):
        return str(p)
    raise BatchedBenchNotFound(
        f"{BATCHED_BENCH_EXE} not found: give its path with --batched-bench PATH, or set {BATCHED_BENCH_ENV}=PATH, "
        f"or put it on PATH (searched too: {p}). Build it with benchmarks/build_batched_bench.sh from the "
        "source tree, or skip it with --no-batched-bench")


def batched_bench_ctx(pp: int, tg: int, n_parallel: int) -> int:
    """-c for llama-batched-bench: every one of B non-unified streams holds pp + tg."""
    return n_parallel * (pp + tg)


def batched_bench_command(exe: str, model: str, pp: int, tg: int, n_parallel: int, threads: int,
                          flash_attn: str, n_gpu_layers: int = 0, repack: bool = True) -> List[str]:
    return [exe, "-m", model, "-c", str(batched_bench_ctx(pp, tg, n_parallel)), "-b", "2048", "-ub", "512",
            "-npp", str(pp), "-ntg", str(tg), "-npl", str(n_parallel), "-t", str(threads), "-tb", str(threads),
            "-ngl", str(n_gpu_layers), "-fa", flash_attn, "-no-kvu", "--repack" if repack else "--no-repack",
            "--output-format", "jsonl"]


def run_batched_bench(cmd: List[str], timeout: float = 1800.0) -> Measurement:
    """One llama-batched-bench process (one batch size): its jsonl row and peak RSS.

    The peak RSS is the child's VmHWM, sampled every 20 ms while it runs (its last value
    is the peak up to then). wait4's ru_maxrss is only a fallback: on Linux it carries the
    RSS of this (large) parent across fork+exec.
    """
    hwm: Optional[int] = None
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            kib = vmhwm_kib(str(p.pid))  # before wait4: the process is still there to read
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
    return Measurement(wall_s=float(r["t"]), prompt_tokens=pl * pp, completion_tokens=pl * tg,
                       e2e_tps=pl * tg / float(r["t"]), gen_tps=float(r["speed_tg"]), prompt_tps=float(r["speed_pp"]),
                       prompt_s=float(r["t_pp"]), gen_s=float(r["t_tg"]),
                       peak_rss_mib=(hwm if hwm is not None else ru_maxrss_kib(ru)) / 1024.0, raw=r)


class BatchedBench(Implementation):
    """(c) llama-batched-bench at the variant's mean prompt length (random tokens, as it
    always uses) and longest max_tokens."""

    name = BATCHED_BENCH

    def __init__(self, exe: str, settings: Settings) -> None:
        self.exe = exe
        self.settings = settings

    def run(self, variant: Variant, n_parallel: Optional[int]) -> Measurement:
        s = self.settings
        pp = max(1, round(variant.mean_prompt_tokens))
        cmd = batched_bench_command(self.exe, s.model_path, pp, max(variant.max_tokens), n_parallel or 1,
                                    s.threads, s.flash_attn, s.n_gpu_layers, s.repack)
        return run_batched_bench(cmd)
