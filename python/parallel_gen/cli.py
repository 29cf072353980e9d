"""Command line: ``parallel-gen <command>`` (also ``python -m parallel_gen``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DEMO_PROMPTS = [
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive three tips for learning to code.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nTranslate 'good morning' into Spanish.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nIs the sentiment of 'I loved this film!' positive or negative?<|im_end|>\n<|im_start|>assistant\n",
]


def _demo(args: argparse.Namespace) -> int:
    import parallel_gen as pg
    from parallel_gen.models import default_model_path

    path = args.model or default_model_path()
    with pg.Model(path, n_parallel=len(DEMO_PROMPTS), n_ctx=512) as model:
        results = pg.generate_parallel(model, DEMO_PROMPTS, max_tokens=args.max_tokens, temperature=0.7, seed=0)
    for c in results:
        question = c.prompt.split("user\n", 1)[-1].split("<|im_end|>", 1)[0]
        print(f"--- [{c.index}] {question}\n{c.text.strip()}\n    ({c.completion_tokens} tokens, {c.finish_reason})")
    s = results.stats
    print(f"\n{s.prompts} prompts, {s.completion_tokens} tokens in {s.wall_seconds:.2f} s: "
          f"{s.generation_tokens_per_second:.0f} tokens/s generation, {s.decode_calls} batched decode calls")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallel-gen", description="Batched text generation with llama.cpp")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a few prompts on the default model")
    d.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    d.add_argument("--max-tokens", type=int, default=96)
    d.set_defaults(func=_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as e:  # a missing model: say how to get it, no traceback
        print(f"parallel-gen: {e}", file=sys.stderr)
        return 2
