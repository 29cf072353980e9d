"""``parallel-gen demo``: a few chat questions answered in one batch on the default model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import ExitStatus, add_progress_option

DEMO_QUESTIONS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for learning to code.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that reverses a string.",
    "Is the sentiment of 'I loved this film!' positive or negative?",
]


HELP = "answer a few questions on the default model, in one batch"
DESCRIPTION = None
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``demo``."""
    p.add_argument("-m", "--model", help="GGUF chat model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("-n", "--max-tokens", type=int, default=96, help="most tokens per answer (default: 96)")
    p.add_argument("--temperature", type=float, default=0.2, help="(default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--n-parallel", type=int, metavar="N", help="sequences decoded together (default: all questions)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: every core this process may use)")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    add_progress_option(p)


def run(args: argparse.Namespace) -> int:
    """The ``demo`` command."""
    from ..chat import chat_parallel
    from ..generate import generate_parallel
    from ..model import Model
    from ..model_files import default_model_path

    path = args.model or default_model_path()
    n_parallel = args.n_parallel or len(DEMO_QUESTIONS)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    with Model(path, n_parallel=n_parallel, n_ctx=512, n_batch=max(512, n_parallel), n_threads=args.threads,
               verbose=args.verbose) as model:
        print(f"{model.description} ({path}), {n_parallel} sequences in one batch\n")
        if model.chat_template() is not None:
            conversations = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
            results = chat_parallel(model, conversations, progress=args.progress, **sampling)
        else:  # a base model (Gemma 3 270M, the second choice): plain question/answer prompts
            prompts = [f"Question: {q}\nAnswer:" for q in DEMO_QUESTIONS]
            results = generate_parallel(model, prompts, stop=["\nQuestion:"], **sampling)
    for c, q in zip(results, DEMO_QUESTIONS):
        print(f"--- [{c.index}] {q}\n{c.text.strip()}\n    ({c.completion_tokens} tokens, {c.finish_reason})")
    print()
    print_stats(results.stats, sys.stdout)
    return ExitStatus.OK


def print_stats(s: Any, out: Any) -> None:
    """The statistics line of a BatchResult."""
    print(f"{s.prompts} prompts, {s.prompt_tokens} prompt + {s.completion_tokens} generated tokens in "
          f"{s.wall_seconds:.2f} s: {s.prompt_tokens_per_second:.0f} prompt tok/s, "
          f"{s.generation_tokens_per_second:.0f} generation tok/s, {s.decode_calls} batched decode calls",
          file=out)
