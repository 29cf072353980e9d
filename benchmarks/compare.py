"""The cost of pg.compare: N texts x 2 models x 2 templates against the same classify calls
done by hand (each model opened once with the same settings, one pg.classify per template).

compare should cost its classify calls and nothing more: the ratio compare / by-hand is
the figure (target about 1.0; compare also computes the agreement, 1000 bootstrap
replicates, reported separately). Rounds alternate the two, the median is reported.

    python benchmarks/compare.py --texts 200 --rounds 3 --json benchmarks/results-compare.json
    python benchmarks/compare.py --texts 8 --rounds 1          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import parallel_gen as pg
from parallel_gen import model_files

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify import LABELS, make_texts  # noqa: E402  (the same reviews as the classify benchmark)

TEMPLATES = {"plain": "Text: {text}\nSentiment ({labels}):", "review": "Review: {text}\nThe review is"}


def by_hand(paths: Dict[str, str], texts: List[str], options: dict) -> List[List[str]]:
    """What a user writes without compare: open each model, classify once per template."""
    labels = []
    for path in paths.values():
        with pg.Model(path, **options) as m:
            for template in TEMPLATES.values():
                labels.append([c.label for c in pg.classify(m, texts, LABELS, template=template)])
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    texts = make_texts(a.texts)
    paths = {"smollm2": str(model_files.smollm2_path()), "gemma3": str(model_files.gemma3_path())}
    # The same settings both ways: n_ctx given, so neither sizes the context.
    options = dict(n_parallel=16, n_ctx=128, n_threads=a.threads, flash_attn=True, prompt_cache=False)
    hand_s, compare_s, agree_s = [], [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        hand = by_hand(paths, texts, options)
        hand_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = pg.compare(paths, texts, LABELS, templates=TEMPLATES, model_options=options)
        compare_s.append(time.perf_counter() - t0)
        wide = result.wide()
        assert [wide[c.name] for c in result.coders] == hand, "compare's labels differ from the same calls by hand"
        t0 = time.perf_counter()
        pg.agreement(wide)
        agree_s.append(time.perf_counter() - t0)
    out = {
        "texts": a.texts, "models": list(paths), "templates": list(TEMPLATES), "rounds": a.rounds,
        "model_options": options, "cpu_count": os.cpu_count(),
        "by_hand_s": statistics.median(hand_s), "compare_s": statistics.median(compare_s),
        "agreement_s": statistics.median(agree_s),
        "ratio_compare_over_by_hand": statistics.median(compare_s) / statistics.median(hand_s),
        "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
