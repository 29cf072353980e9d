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
from typing import Callable, Dict, List, Optional

import parallel_gen as pg

from ..cli.options import ExitStatus
from .impls import (BatchedBench, ConcurrentCallers, GenerateParallel, Implementation, LlamaLoop, Settings,
                    find_batched_bench, open_llama)
from .measure import PeakRSS
from .records import Measurement, Run
from .report import aggregate, check_matplotlib, document, fmt, format_summary, format_table, write_plot
from .workloads import AGAINST_LLAMA_CPP, LOOP, MIXED_LENGTHS, Workload, build_workload


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
    from parallel_gen.config import cpu_threads
    from parallel_gen.model_files import default_model_path
    from parallel_gen.repack import use_extra_bufts

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
    settings = Settings(model_path, args.threads or cpu_threads(), args.flash_attn, args.n_gpu_layers,
                        args.samples, args.callers, use_extra_bufts(args.repack),
                        prompt_cache=args.prompt_cache is not False)

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
        "prompt_cache": settings.prompt_cache,
        "batched_bench": bb_exe, "n_ctx_llama": llm.n_ctx(),
        "n_ctx_per_sequence": {w.name: w.variants[0].n_ctx for w in workloads},
        "sampling": {"temperature": 0.0, "ignore_eos": True, "loop_ignore_eos": "logit_bias -inf on EOG tokens"},
        "rss_method": probe.method,
        "versions": {"parallel_gen": pg.__version__, "llama_cpp_python": llama_cpp.__version__,
                     "python": platform.python_version()},
        "platform": platform.platform(), "cpus": os.cpu_count(), "cpus_usable": cpu_threads(),
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
    return ExitStatus.OK
