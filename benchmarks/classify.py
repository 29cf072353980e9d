"""Annotation throughput: pg.classify against the ways people get label probabilities today.

On the same texts, prompts (classify's default template), model, threads and flash-attention
setting, one after another in one process:

  classify      pg.classify(model, texts, labels): P(label | text) for every label
  llama-loop    llama-cpp-python, Llama(logits_all=True): per text, per label, evaluate
                prompt + label, reusing the KV of the text's prompt from the previous label
                (its prefix cache), and read the label's log-softmax
  choices       generate_parallel with choices=labels and logprobs: one sampled label per
                text with its logprob (no distribution over the labels)
  one-token     generate_parallel with max_tokens=1: the cost of reading the prompts alone

Reported: the median wall seconds of each over the rounds, classify's time relative to the
others (target: classify <= 1.15 x one-token), and how far the llama-loop probabilities are
from classify's (the same computation, so they should agree to about 1e-3).

    python benchmarks/classify.py --texts 200 --rounds 3 --json benchmarks/results-classify.json
    python benchmarks/classify.py --texts 4 --rounds 1          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import llama_cpp
import numpy as np

import parallel_gen as pg
from parallel_gen.classification import DEFAULT_TEMPLATE, label_probabilities
from parallel_gen.model_files import default_model_path
from parallel_gen.scoring import Score, split_boundary

LABELS = ["positive", "negative", "neutral"]
_SUBJECTS = ["The movie", "This hotel", "My new phone", "The book", "That restaurant", "The concert", "This laptop",
             "The game", "Our flight", "The museum"]
_VERDICTS = ["was wonderful from start to finish", "was a complete waste of money", "arrived on Tuesday",
             "exceeded every expectation I had", "broke after a single day", "is about what you would expect",
             "made me smile the whole evening", "had rude staff and cold food", "was fine, nothing special",
             "is the best I have owned", "left me bored and annoyed", "opens at nine in the morning",
             "felt overpriced for what it is", "was recommended by a friend", "delighted the whole family",
             "kept crashing every few minutes", "is located near the station", "was worth every penny",
             "disappointed everyone who came", "was neither good nor bad"]


def make_texts(n: int) -> List[str]:
    """n distinct short reviews, deterministic."""
    out = []
    for k in range(n):
        s, v = _SUBJECTS[k % len(_SUBJECTS)], _VERDICTS[(k // len(_SUBJECTS) + k) % len(_VERDICTS)]
        out.append(f"{s} {v}." + (f" (review {k})" if k >= len(_SUBJECTS) * len(_VERDICTS) else ""))
    return out


def prompts_for(texts: List[str]) -> List[str]:
    joined = ", ".join(LABELS)
    return [DEFAULT_TEMPLATE.replace("{labels}", joined).replace("{text}", t) for t in texts]


@dataclass
class Timing:
    name: str
    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def llama_loop(llm: llama_cpp.Llama, prompts: List[str]) -> np.ndarray:
    """P(label | prompt) by llama-cpp-python, one evaluation per label, reusing the prompt's KV."""
    probs = []
    for prompt in prompts:
        head, _ = split_boundary(prompt, "")
        p_ids = llm.tokenize(head.encode(), add_bos=True, special=True)
        scores = []
        for label in LABELS:
            c_ids = llm.tokenize(split_boundary(prompt, label)[1].encode(), add_bos=False, special=False)
            ids = p_ids + c_ids
            cached = list(llm.input_ids[:llm.n_tokens])
            keep = 0
            while keep < min(len(cached), len(ids) - 1) and cached[keep] == ids[keep]:
                keep += 1
            keep = min(keep, len(p_ids))  # the prompt's last logits row must be there (logits_all)
            llm.n_tokens = keep
            llm.eval(ids[keep:])
            rows = np.asarray(llm.scores[len(p_ids) - 1:len(ids) - 1], dtype=np.float64)
            mx = rows.max(axis=1, keepdims=True)
            logsm = rows - mx - np.log(np.exp(rows - mx).sum(axis=1, keepdims=True))
            lps = [float(logsm[k, t]) for k, t in enumerate(c_ids)]
            scores.append(Score(sum(lps), lps, c_ids))
        probs.append(label_probabilities(scores))
    return np.array(probs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M)")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-parallel", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=256, help="tokens per sequence (and the Llama's context)")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on (all methods)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    path = str(args.model or default_model_path())
    texts = make_texts(args.texts)
    prompts = prompts_for(texts)
    model = pg.Model(path, n_parallel=args.n_parallel, n_ctx=args.n_ctx, n_threads=args.threads,
                     flash_attn=args.flash_attn)
    llm = pg.load_llama(path, n_ctx=args.n_ctx, logits_all=True, flash_attn=args.flash_attn, verbose=False,
                        **({"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}))
    heads = [split_boundary(p, "")[0] for p in prompts]
    choices = [" " + lab for lab in LABELS]
    runs: Dict[str, Callable[[], object]] = {
        "classify": lambda: pg.classify(model, texts, LABELS),
        "llama-loop": lambda: llama_loop(llm, prompts),
        "choices": lambda: pg.generate_parallel(model, heads, choices=choices, logprobs=len(LABELS), max_tokens=8,
                                                temperature=0),
        "one-token": lambda: pg.generate_parallel(model, heads, max_tokens=1, temperature=0),
    }
    timings = {name: Timing(name, []) for name in runs}
    try:
        for _ in range(args.rounds):
            for name, fn in runs.items():
                llm.reset()
                timings[name].seconds.append(timed(fn))
        ours = pg.classify(model, texts, LABELS).probs
        theirs = llama_loop(llm, prompts)
    finally:
        model.close()
        llm.close()
    c = timings["classify"].median
    report = {
        "model": path, "texts": len(texts), "labels": LABELS, "rounds": args.rounds, "n_parallel": args.n_parallel,
        "flash_attn": args.flash_attn, "threads": args.threads,
        "median_seconds": {n: t.median for n, t in timings.items()},
        "seconds": {n: t.seconds for n, t in timings.items()},
        "classify_vs": {n: c / t.median for n, t in timings.items() if n != "classify"},
        "max_prob_difference_vs_llama_loop": float(np.max(np.abs(ours - theirs))),
    }
    for n, t in timings.items():
        print(f"{n:<11} {t.median:8.2f} s   ({len(texts) / t.median:7.1f} texts/s)")
    print("classify / one-token: %.2fx (target <= 1.15)" % report["classify_vs"]["one-token"])
    print("classify / llama-loop: %.2fx, / choices: %.2fx" % (report["classify_vs"]["llama-loop"],
                                                                report["classify_vs"]["choices"]))
    print("max |P_classify - P_llama_loop| = %.2g" % report["max_prob_difference_vs_llama_loop"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
