"""Batch-job figures (issue 12), measured in one run on one machine.

1. throughput: a ROWS-prompt JSONL file through `parallel-gen generate` (streamed,
   written row by row) against `generate_parallel` on the same prompts in one call;
2. flat memory: peak RSS of a BIG_ROWS-row job against a ROWS-row job;
3. KV sizing: peak RSS of the CLI with the old default (--n-ctx 4096) and with n_ctx
   sized to the work (no --n-ctx), same input (the issue's 16 slots, 16 tokens);
4. KV quantization: peak RSS, tokens/s and greedy agreement of q8_0 against f16 K/V.

Every run is a fresh subprocess (wall time end to end, model load included; peak RSS
from getrusage of a helper process that runs only it). Usage:

    python benchmarks/jobs.py --json benchmarks/results-jobs.json   # every figure, the issue's sizes
    python benchmarks/jobs.py --only throughput --only sizing        # some of them
    python benchmarks/jobs.py --rows 16 --big-rows 32 --sizing-rows 16 --max-tokens 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent

SUBJECTS = ["the sea", "a city at night", "bread", "mountains", "a library", "rain", "a bicycle", "the moon",
            "coffee", "a garden", "winter", "a train station", "music", "an old map", "the desert", "a river"]


@dataclass
class Run:
    """One subprocess: what it did and what it cost."""

    name: str
    rows: int
    seconds: float
    completion_tokens: int
    peak_rss_mib: float

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"Write one sentence about {SUBJECTS[i % len(SUBJECTS)]} "
                                                   f"(note {i}):"}) + "\n")


def cli(args: argparse.Namespace, src: Path, out: Path, max_tokens: int, *extra: str) -> List[str]:
    model = ["-m", args.model] if args.model else []
    return [sys.executable, "-m", "parallel_gen", "generate", "-f", str(src), "-o", str(out), "--overwrite",
            "-n", str(max_tokens), "--temperature", "0", "--ignore-eos", "--n-parallel", str(args.n_parallel),
            "--threads", str(args.threads), "--progress" if args.progress else "--no-progress", *model, *extra]


def output_tokens(path: Path):
    def count(_stdout: str) -> int:
        with open(path) as f:
            return sum(json.loads(line)["completion_tokens"] for line in f)
    return count


PARALLEL = """
import json, sys
import parallel_gen as pg
from parallel_gen.model_files import default_model_path
src, model, n_parallel, n_ctx, threads, max_tokens = sys.argv[1:7]
prompts = [json.loads(line)["prompt"] for line in open(src)]
with pg.Model(model or default_model_path(), n_parallel=int(n_parallel), n_ctx=int(n_ctx), n_threads=int(threads)) as m:
    r = pg.generate_parallel(m, prompts, max_tokens=int(max_tokens), temperature=0, ignore_eos=True)
print(r.stats.completion_tokens)
"""


def measure(name: str, cmd: List[str], rows: int, count) -> Run:
    """Runs ``cmd`` under a fresh helper process, whose RUSAGE_CHILDREN maximum is then
    this run's own peak RSS (not the largest of all runs so far)."""
    probe = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
             "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],"
             "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    res = json.loads(p.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{name} failed ({res['rc']}):\n{res['err']}")
    return Run(name, rows, seconds, count(res["out"]), res["rss"])


FIGURES = ("throughput", "rss", "sizing", "kv")


def throughput(args: argparse.Namespace, d: Path) -> Tuple[List[Run], Dict[str, float]]:
    """The streamed CLI job against one generate_parallel call, same prompts and n_ctx."""
    src, out = d / "rows.jsonl", d / "out.jsonl"
    write_prompts(src, args.rows)
    par = measure("generate_parallel, one call", [sys.executable, "-c", PARALLEL, str(src), args.model,
                       str(args.n_parallel), str(args.n_ctx), str(args.threads), str(args.max_tokens)],
                       args.rows, lambda s: int(s.split()[-1]))
    job = measure("CLI job", cli(args, src, out, args.max_tokens, "--n-ctx", str(args.n_ctx)), args.rows,
                       output_tokens(out))
    return [par, job], {"job_vs_generate_parallel_throughput": job.tokens_per_second / par.tokens_per_second}


def rss(args: argparse.Namespace, d: Path) -> Tuple[List[Run], Dict[str, float]]:
    """Peak RSS of a big and a small job: flat in the number of rows (few tokens per row:
    the rows, not the tokens, are what could pile up)."""
    runs = []
    for rows in (args.rows, args.big_rows):
        src, out = d / f"rss-{rows}.jsonl", d / "out.jsonl"
        write_prompts(src, rows)
        runs.append(measure(f"CLI job, {rows} rows, {args.rss_max_tokens} tokens", cli(
            args, src, out, args.rss_max_tokens, "--n-ctx", str(args.n_ctx)), rows, output_tokens(out)))
    return runs, {"peak_rss_big_vs_small": runs[1].peak_rss_mib / runs[0].peak_rss_mib}


def sizing(args: argparse.Namespace, d: Path) -> Tuple[List[Run], Dict[str, float]]:
    """The CLI with the old default n_ctx (4096) and with n_ctx sized to the work."""
    src, out = d / "sizing.jsonl", d / "out.jsonl"
    write_prompts(src, args.sizing_rows)
    old = measure("CLI, --n-ctx 4096 (the old default)", cli(args, src, out, args.max_tokens, "--n-ctx", "4096"),
                       args.sizing_rows, output_tokens(out))
    sized = measure("CLI, n_ctx sized to the work", cli(args, src, out, args.max_tokens), args.sizing_rows,
                         output_tokens(out))
    return [old, sized], {"rss_old_default_mib": old.peak_rss_mib, "rss_sized_mib": sized.peak_rss_mib}


def kv(args: argparse.Namespace, d: Path) -> Tuple[List[Run], Dict[str, float]]:
    """q8_0 against f16 K/V at a context where the KV cache matters."""
    src = d / "kv.jsonl"
    write_prompts(src, args.rows)
    runs, texts = [], {}
    for kv_type in ("f16", "q8_0"):
        out = d / f"kv-{kv_type}.jsonl"
        flags = ["--n-ctx", str(args.kv_n_ctx), "--type-k", kv_type, "--type-v", kv_type]
        cmd = cli(args, src, out, args.max_tokens, *flags)
        runs.append(measure(f"CLI, KV {kv_type}, n_ctx {args.kv_n_ctx}", cmd, args.rows, output_tokens(out)))
        texts[kv_type] = [json.loads(line)["text"] for line in open(out)]
    agree = sum(a == b for a, b in zip(texts["f16"], texts["q8_0"])) / max(1, len(texts["f16"]))
    return runs, {"q8_0_vs_f16_tokens_per_second": runs[1].tokens_per_second / runs[0].tokens_per_second,
                  "q8_0_vs_f16_peak_rss": runs[1].peak_rss_mib / runs[0].peak_rss_mib,
                  "q8_0_greedy_texts_equal_to_f16": agree}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", choices=FIGURES, help="measure only these figures (repeatable)")
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--big-rows", type=int, default=50000)
    p.add_argument("--sizing-rows", type=int, default=3000, help="rows of the KV-sizing comparison (the issue's)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rss-max-tokens", type=int, default=1, help="tokens per row of the RSS pair")
    p.add_argument("--n-parallel", type=int, default=16)
    p.add_argument("--n-ctx", type=int, default=256, help="n_ctx of the throughput and RSS runs")
    p.add_argument("--kv-n-ctx", type=int, default=2048, help="n_ctx of the KV quantization runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("-m", "--model", default="", help="GGUF file (default: the packaged default model)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)

    runs: List[Run] = []
    figures: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or FIGURES:
            r, f = globals()[name](args, Path(tmp))
            runs += r
            figures.update(f)
    print(f"{'run':44} {'rows':>7} {'s':>8} {'tok/s':>8} {'peak RSS MiB':>13}")
    for r in runs:
        print(f"{r.name:44} {r.rows:>7} {r.seconds:>8.1f} {r.tokens_per_second:>8.1f} {r.peak_rss_mib:>13.0f}")
    print()
    for k, v in figures.items():
        print(f"{k:40} {v:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": [dict(asdict(r), tokens_per_second=
                                              r.tokens_per_second) for r in runs], "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
