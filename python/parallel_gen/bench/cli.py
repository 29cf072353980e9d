"""``parallel-gen bench``: the command line, and the driver that alternates rounds.

Each round runs, per workload and variant, every implementation the variant names
(loop, generate_parallel at every --n-parallel, concurrent callers, llama-batched-bench),
so that drift in a shared machine's load hits them all; the report gives medians over
rounds of each figure and of each per-round ratio. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional

import parallel_gen as pg

from .impls import (BatchedBench, ConcurrentCallers, GenerateParallel, Implementation, LlamaLoop, Settings,
                    find_batched_bench, open_llama)
from .measure import PeakRSS
from .records import Measurement, Run
from .report import aggregate, check_matplotlib, document, fmt, format_summary, format_table, write_plot
from .workloads import AGAINST_LLAMA_CPP, LOOP, MIXED_LENGTHS, WORKLOADS, Workload, build_workload

DEFAULT_N_PARALLEL = (1, 2, 4, 8, 16, 32)

DESCRIPTION = ("Benchmark generate_parallel against the llama-cpp-python loop (Llama.create_completion per "
               "prompt) and llama.cpp's llama-batched-bench, in one process, alternating rounds; and the "
               "engine's own workloads (ragged endings, a grammar, concurrent callers).")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _fail(message: str) -> SystemExit:
    return SystemExit(f"parallel-gen bench: {message}")


def run(args: argparse.Namespace) -> int:
    """The ``bench`` command."""
    import llama_cpp

    from parallel_gen._native import _core
    from parallel_gen.model import _cpu_threads
    from parallel_gen.models import default_model_path

    if args.plot:
        check_matplotlib()
    for opt, path in (("--json", args.json), ("--plot", args.plot)):  # fail now, not after the run
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise _fail(f"{opt} {path}: no such directory")
    limit = int(_core.max_parallel_sequences())
    if args.n_parallel[-1] > limit:
        raise _fail(f"n_parallel {args.n_parallel[-1]} is above llama.cpp's limit of {limit} sequences")
    model_path = os.path.abspath(os.fspath(args.model or default_model_path()))
    if not os.path.isfile(model_path):
        raise FileNotFoundError(2, "model file not found", model_path)
    sequences = args.prompts * args.samples
    n_parallel = [b for b in args.n_parallel if b <= sequences]
    skipped = [b for b in args.n_parallel if b > sequences]
    if not n_parallel:
        raise _fail(f"every --n-parallel value exceeds the {sequences} sequences to run")
    if skipped:
        _log(f"note: n_parallel {','.join(map(str, skipped))} skipped: only {sequences} sequences "
             f"(raise --prompts to measure them)")
    names = args.workload
    wants_bb = not args.no_batched_bench and any(w in AGAINST_LLAMA_CPP for w in names)
    bb_exe = find_batched_bench(args.batched_bench) if wants_bb else None  # before any model is loaded
    settings = Settings(model_path, args.threads or _cpu_threads(), args.flash_attn, args.n_gpu_layers,
                        args.samples, args.callers, prompt_cache=not args.no_prompt_cache)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    # One Llama for the loop, its weights shared with every generate_parallel Model. Its
    # context fits the longest prompt any workload builds (checked below) + max_tokens.
    longest = max(MIXED_LENGTHS[-1], args.prefix_tokens) + 64
    llm = open_llama(settings, _round_up(longest + args.max_tokens + 8, 256))

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    workloads = [build_workload(n, args.prompts, count, args.max_tokens, args.prefix_tokens, args.callers)
                 for n in names]
    for w in workloads:
        if w.max_prompt_tokens + w.max_tokens > llm.n_ctx():
            raise _fail(f"internal error: workload {w.name} needs {w.max_prompt_tokens + w.max_tokens} > "
                        f"{llm.n_ctx()} tokens of context")
    impls: Dict[str, Implementation] = {i.name: i for i in (
        GenerateParallel(llm, settings), ConcurrentCallers(llm, settings),
        *([] if args.no_loop else [LlamaLoop(llm, settings)]),
        *([BatchedBench(bb_exe, settings)] if bb_exe else []))}
    llm.create_completion("Warm-up.", max_tokens=4, temperature=0.0)  # page the weights in

    with PeakRSS() as probe:
        pass
    config = {
        "model": model_path, "model_bytes": os.path.getsize(model_path), "prompts": args.prompts,
        "samples": args.samples, "max_tokens": args.max_tokens, "n_parallel": n_parallel,
        "n_parallel_skipped": skipped, "workloads": names, "threads": settings.threads,
        "flash_attn": args.flash_attn, "n_gpu_layers": args.n_gpu_layers, "backends": list(_core.backends()),
        "repeat": args.repeat, "prefix_tokens": args.prefix_tokens, "callers": args.callers, "loop": not args.no_loop,
        "prompt_cache": not args.no_prompt_cache,
        "batched_bench": bb_exe, "n_ctx_llama": llm.n_ctx(),
        "n_ctx_per_sequence": {w.name: w.variants[0].n_ctx for w in workloads},
        "sampling": {"temperature": 0.0, "ignore_eos": True, "loop_ignore_eos": "logit_bias -inf on EOG tokens"},
        "rss_method": probe.method,
        "versions": {"parallel_gen": pg.__version__, "llama_cpp_python": llama_cpp.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(), "cpus": os.cpu_count(), "cpus_usable": _cpu_threads(),
        "loadavg_start": load_start,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _log(f"bench: {os.path.basename(model_path)}, {args.prompts} prompts x {args.max_tokens} tokens, "
         f"n_parallel {n_parallel}, {settings.threads} thread(s), flash_attn {args.flash_attn}, "
         f"{args.repeat} round(s), batched-bench: {bb_exe or 'not used'}")

    runs: List[Run] = []

    def record(wl: Workload, variant: str, rnd: int, impl: str, b: Optional[int],
               fn: Callable[[], Measurement]) -> None:
        r = Run(wl.name, variant, impl, b, rnd, args.prompts)
        try:
            r.measurement = m = fn()
            _log(f"  [{rnd + 1}/{args.repeat}] {wl.name:10s} {variant:11s} {impl:13s} "
                 f"B={'-' if b is None else b:>3}: {m.wall_s:7.2f} s, gen {fmt(m.gen_tps, '.1f')} t/s, "
                 f"e2e {m.e2e_tps:.1f} t/s")
        except (RuntimeError, OSError, pg.ModelLoadError, pg.GenerationError) as e:  # one failed: keep going
            r.error = str(e)
            _log(f"  [{rnd + 1}/{args.repeat}] {wl.name} {variant} {impl} B={b}: ERROR {str(e).splitlines()[0]}")
        runs.append(r)

    config["interrupted"] = False
    try:
        for wl in workloads:
            _log(f"workload {wl.name}: {wl.description}")
            for rnd in range(args.repeat):
                for v in wl.variants:
                    for name in v.impls:
                        impl = impls.get(name)
                        if impl is None:  # --no-loop / --no-batched-bench
                            continue
                        for b in ([None] if name == LOOP else n_parallel):
                            record(wl, v.name, rnd, name, b, lambda: impl.run(v, b))
    except KeyboardInterrupt:  # report what was measured so far
        config["interrupted"] = True
        _log("interrupted: reporting the measurements taken so far")
        if not runs:
            raise
    llm.close()

    report = aggregate(runs, workloads)
    config["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = format_table(report.rows)
    notes = format_summary(report)
    print()
    print(f"{os.path.basename(model_path)}: {args.prompts} prompts x {args.max_tokens} tokens, "
          f"{settings.threads} thread(s), flash_attn {args.flash_attn}; median of {args.repeat} round(s); "
          f"load average {fmt(load_start[0] if load_start else None, '.2f')} -> "
          f"{fmt(config['loadavg_end'][0] if config['loadavg_end'] else None, '.2f')}")
    print(table)
    if notes:
        print()
        print(notes)
    print("\nFigures are ratios: absolute times on a shared machine are not stable.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document(config, workloads, report, table), f, indent=2)
        _log(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, report.rows, config)
        _log(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------- arguments

def _n_parallel_list(text: str) -> List[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"n_parallel values must be >= 1, got {text!r}")
    return values


def _workload_list(text: str) -> List[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    if names == ["all"]:
        return list(WORKLOADS)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(WORKLOADS)} or all")
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: parallel_gen.models.default_model_path())")
    p.add_argument("--prompts", type=_positive, default=16, metavar="N", help="prompts per workload (default 16)")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--n-parallel", type=_n_parallel_list, default=list(DEFAULT_N_PARALLEL), metavar="LIST",
                   help="comma-separated n_parallel values (default 1,2,4,8,16,32); values above the "
                        "number of sequences are skipped")
    p.add_argument("--workload", type=_workload_list, default=list(AGAINST_LLAMA_CPP), metavar="LIST",
                   help="comma-separated workloads, or all: short (independent short prompts), prefix (prompts "
                        "sharing a ~300-token prefix, plus its no-reuse control), mixed (mixed prompt lengths), "
                        "ragged (outputs ending at different times), grammar (JSON schema against free), "
                        "concurrent (threads sharing one Model against one call). Default: short,prefix,mixed")
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
                   help="llama-batched-bench executable (default: $PARALLEL_GEN_BATCHED_BENCH, else on PATH, "
                        "else the source tree's benchmarks/bin/)")
    p.add_argument("--no-batched-bench", action="store_true", help="do not run llama-batched-bench")
    p.add_argument("--no-loop", action="store_true", help="do not run the llama-cpp-python loop")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="open generate_parallel's Models with prompt_cache=False")
    p.add_argument("--prefix-tokens", type=_positive, default=300, help="shared prefix length (default 300)")
    p.add_argument("--callers", type=_positive, default=8, metavar="K",
                   help="threads of the concurrent workload, the prompts split among them (default 8)")
    p.add_argument("--samples", type=_positive, default=1, metavar="K",
                   help="completions per prompt (SamplingParams.n; the loop runs each prompt K times)")
    p.add_argument("--json", metavar="FILE", help="write every measurement, medians and ratios as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of throughput against n_parallel (needs matplotlib)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers the ``bench`` subcommand on the parallel-gen command line."""
    p = subparsers.add_parser("bench", help="benchmark generate_parallel against the llama-cpp-python loop",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m parallel_gen.bench``: the same command outside parallel-gen."""
    p = argparse.ArgumentParser(prog="parallel-gen bench", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except FileNotFoundError as e:  # the model, or llama-batched-bench
        print(f"parallel-gen bench: {e}", file=sys.stderr)
        return 2
