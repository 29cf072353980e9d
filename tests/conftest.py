"""Shared fixtures: the two real test models, opened once per session.

A missing model is a test failure, never a skip: the suite is meaningless without them.
A missing optional extra (ray, matplotlib) skips its tests, unless PG_REQUIRE_EXTRAS=1
(``make test``, which installs the test extra, sets it): then it fails them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

import parallel_gen as pg
from parallel_gen import model_files

PROMPTS_16 = [
    "The capital of France is",
    "Once upon a time",
    "def fib(n):",
    "1, 2, 3, 4,",
    "The best way to learn programming is",
    "Water boils at",
    "In 1492, Columbus",
    "The mitochondria is",
    "Dear Sir or Madam,",
    "Q: What is 7 times 8?\nA:",
    "My favourite food is",
    "The quick brown fox",
    "import numpy as np\n",
    "Translate to French: cheese ->",
    "The theory of relativity",
    "Roses are red,",
]


REQUIRE_EXTRAS = "PG_REQUIRE_EXTRAS"


def import_extra(module: str, extra: str) -> ModuleType:
    """``module``, part of the optional extra ``extra``; when it cannot be imported, a skip
    saying how to install it, or a failure when the extras are required (REQUIRE_EXTRAS=1)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"{module} cannot be imported ({e}): pip install 'parallel_gen[{extra}]'"
        if os.environ.get(REQUIRE_EXTRAS) == "1":
            pytest.fail(f"{REQUIRE_EXTRAS}=1 but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def _require(fn, name: str) -> Path:
    try:
        return fn()
    except model_files.ModelNotInstalledError as e:
        pytest.fail(f"test model {name} missing: {e}", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _require(model_files.smollm2_path, "SmolLM2-135M")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _require(model_files.gemma3_path, "Gemma 3 270M")


# The shared Models run without the prompt cache: many tests compare a call's greedy
# output with another call's, and a prompt decoded from a cached prefix (whatever earlier
# tests left there) can round differently. test_prompt_cache tests the cache.
@pytest.fixture(scope="session")
def smol(smollm2_path):
    """SmolLM2 with 8 slots of 512 tokens: the workhorse of the suite."""
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=512, prompt_cache=False) as m:
        yield m


@pytest.fixture(scope="session")
def gemma(gemma3_path):
    with pg.Model(gemma3_path, n_parallel=8, n_ctx=512, prompt_cache=False) as m:
        yield m


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Two greedy runs that cut a prefill differently (cached or shared prefixes, another CPU's
# kernels) round their logits differently: near-tied tokens may swap. A broken KV reuse
# derails a prompt from its first token instead. So: the first step's distributions agree
# within a tolerance, and a run may leave the reference only where the reference's two best
# tokens were near-tied. Results need logprobs >= 2.
NEAR_TIE = 0.2
LOGPROB_TOL = 0.15


def agree_up_to_near_ties(got, ref, near_tie: float = NEAR_TIE, tol: float = LOGPROB_TOL) -> int:
    """``got`` and ``ref``: Completions (or BatchResults) of the same prompts, greedy, with
    logprobs >= 2. Returns how many are token-identical (for the caller to report, not to
    hold to a count that depends on the CPU)."""
    identical = 0
    for g, r in zip(got, ref, strict=True):
        glp, rlp = g.outputs[0].logprobs, r.outputs[0].logprobs
        assert glp and rlp, "agree_up_to_near_ties needs logprobs"
        mine = {t.token_id: t.logprob for t in glp[0].top}
        theirs = {t.token_id: t.logprob for t in rlp[0].top}
        shared = mine.keys() & theirs.keys()
        assert shared, (g.token_ids, r.token_ids, glp[0].top, rlp[0].top)
        for t in shared:
            assert abs(mine[t] - theirs[t]) < tol, (t, mine[t], theirs[t], g.token_ids, r.token_ids)
        a, b = g.token_ids, r.token_ids
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            identical += len(a) == len(b)
            continue
        top = rlp[d].top
        assert len(top) >= 2 and top[0].logprob - top[1].logprob < near_tie, (
            f"left the reference at step {d} where it led by {top[0].logprob - top[1].logprob:.3f}", a, b)
    return identical


def terminal_sigint() -> None:
    """preexec_fn for a child that is sent Ctrl-C: SIGINT handled as in a terminal's
    foreground process. A parent started in the background by a shell without job control
    (or under nohup) ignores SIGINT, and a child inherits that through exec: Python then
    never raises KeyboardInterrupt in it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
