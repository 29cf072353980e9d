"""Cost of sequences that end at different times (the usual case: EOS comes when it comes).

16 prompts on 16 slots, half generating --short tokens and half --long, greedy, EOS
ignored. "contiguous": the short ones are prompts 0-7, so the long ones keep consecutive
seq ids when the short ones finish. "alternating": short and long alternate, so the long
ones are left at seq ids 1, 3, 5, ... With one KV stream per sequence llama.cpp decodes
only consecutive ids in one micro-batch; the engine closes such gaps by moving sequences
down (BatchStats.sequence_moves). The figure is the wall-time ratio alternating /
contiguous, measured side by side in one process (1.0: gaps cost nothing).

    PYTHONPATH=python python3 benchmarks/ragged.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import parallel_gen as pg
from parallel_gen.models import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--short", type=int, default=16, help="tokens of the short half")
    ap.add_argument("--long", type=int, default=160, help="tokens of the long half")
    ap.add_argument("--n-ctx", type=int, default=None, help="tokens per sequence (default: --long + 64); "
                    "a sequence's move copies its whole KV stream, so this sets a move's cost")
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    prompts = [f"Question {i + 1}: write a haiku about the sea.\nAnswer:" for i in range(16)]
    orders = {"contiguous": [args.short] * 8 + [args.long] * 8, "alternating": [args.short, args.long] * 8}
    with pg.Model(args.model or default_model_path(), n_parallel=16, n_ctx=args.n_ctx or args.long + 64,
                  n_threads=args.cpu_threads) as model:
        pg.generate_parallel(model, prompts[:2], max_tokens=4)  # warm up
        walls: dict = {name: [] for name in orders}
        ratios = []
        for r in range(args.rounds):
            for name, lengths in orders.items():
                params = [pg.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
                t0 = time.perf_counter()
                res = pg.generate_parallel(model, prompts, params)
                walls[name].append(time.perf_counter() - t0)
                print(f"round {r + 1} {name:11s}: {walls[name][-1]:6.2f} s, {res.stats.completion_tokens} tokens, "
                      f"{res.stats.decode_calls} decode calls, {res.stats.sequence_moves} sequence moves", flush=True)
            ratios.append(walls["alternating"][-1] / walls["contiguous"][-1])
    print(f"alternating / contiguous wall time: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
