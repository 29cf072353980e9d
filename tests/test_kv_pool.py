"""A shared KV pool too small for everything at once: Engine::recover's no-room branches.

With kv_unified=True and kv_size=n_ctx the pool holds one full sequence. llama.cpp
rounds a pool up to 256 cells, so the tests size everything from the engine's real
capacity. Each test states which of its branches its arithmetic forces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import pytest

import parallel_gen as pg
from conftest import agree_up_to_near_ties

N_CTX = 256
INSTRUCTION = ("You are a careful annotator. Read the review below and classify its sentiment as positive, "
               "negative or neutral, then explain your choice in one short sentence. ") * 6
REVIEWS = ["I loved it.", "Awful."]
COUNT = "Count: 1, 2, 3,"


def _engine(model, what):
    return model._require_runner().run_on_engine(what)


def _assert_clean(model):
    s = model.stats()
    assert s.active_requests == 0 and s.slots_busy == 0 and s.queued_prompts == 0
    assert _engine(model, lambda e: e.kv_tokens) == 0


@dataclass
class Run:
    model: pg.Model
    prompts: List[str]
    params: List[pg.SamplingParams]
    result: pg.BatchResult


def _shared_len(model, a: str, b: str) -> int:
    ta, tb = model.tokenize(a), model.tokenize(b)
    return next(k for k, (x, y) in enumerate(zip(ta, tb)) if x != y)


@pytest.fixture(scope="module")
def prefix_run(smollm2_path):
    """One slot over a pool of one sequence's context: a running sequence, and two
    waiting prompts whose ~190-token shared prefix is decoded into the same pool
    meanwhile. The runner's context and the prefix cannot both fit in its last steps."""
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=N_CTX, kv_unified=True, kv_size=N_CTX) as m:
        cap = _engine(m, lambda e: e.kv_capacity)
        assert cap == N_CTX
        prompts = [COUNT] + [f"{INSTRUCTION}Review: {r}\nSentiment:" for r in REVIEWS]
        shared = _shared_len(m, prompts[1], prompts[2])
        # the runner collides with the prefix 6 tokens before its end (fewer steps of contention)
        runner_tokens = cap - shared - len(m.tokenize(COUNT)) + 6
        params = [pg.SamplingParams(max_tokens=runner_tokens, temperature=0, ignore_eos=True, logprobs=2)] + \
            [pg.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 2
        yield Run(m, prompts, params, pg.generate_parallel(m, prompts, params))


def test_the_running_sequence_wins_over_a_waiting_prefix(prefix_run):
    """The prefix's users wait for the runner (one slot): when the pool fills, recover()
    gives up the prefix (queued work yields to running work), and it is chosen again once
    the runner has left its slot. Every prompt completes with the output it has alone."""
    m, prompts, params, r = prefix_run.model, prefix_run.prompts, prefix_run.params, prefix_run.result
    assert r.stats.failed == 0 and r.stats.decode_retries > 0, r.stats
    assert [len(c.token_ids) for c in r] == [p.max_tokens for p in params]
    assert all(c.finish_reason == "length" and c.error is None for c in r)
    assert r.stats.prefix_tokens_reused > 0  # shared once the runner was done
    _assert_clean(m)
    alone = [pg.generate_parallel(m, p, q)[0] for p, q in zip(prompts, params)]
    # the users ran with nothing beside them; the runner's batches were split differently
    # (a unified pool is not batch-invariant), so it may leave its solo run at a near-tie
    assert [c.token_ids for c in r[1:]] == [c.token_ids for c in alone[1:]]
    agree_up_to_near_ties(r[:1], alone[:1])


def test_a_running_sequence_is_not_paused_for_a_prefix_nobody_can_use_yet(prefix_run):
    assert prefix_run.result.stats.preemptions == 0, prefix_run.result.stats


@pytest.fixture(scope="module")
def squeeze(smollm2_path):
    """Two sequences that fill the pool to its last cell in the very step in which the
    first one ends: the decode of both finds one free cell, the split batch's first half
    (the first sequence's last token) takes it, and the second half finds none."""
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=N_CTX, kv_unified=True, kv_size=N_CTX,
                  share_prefix=False) as m:
        cap = _engine(m, lambda e: e.kv_capacity)
        assert cap == N_CTX
        # long prompts: the pool fills in a few dozen steps
        first = f"{INSTRUCTION[:400]}Review: {REVIEWS[0]}\nSentiment:"
        second = "Write a long story about the sea, the wind and the boats. " * 8
        a, b = len(m.tokenize(first)), len(m.tokenize(second))
        if (cap + 3 - a - b) % 2:
            second += " Go"
            b = len(m.tokenize(second))
        # after step s >= 2 the pool holds a + b + 2 (s - 1) cells; the first ends in step k
        k = (cap + 3 - a - b) // 2
        assert 10 < k and a + b + 2 * (k - 2) == cap - 1, (a, b, k)
        params = [pg.SamplingParams(max_tokens=k, temperature=0, ignore_eos=True),
                  pg.SamplingParams(max_tokens=k + 10, temperature=0, ignore_eos=True)]
        yield Run(m, [first, second], params, pg.generate_parallel(m, [first, second], params))


def test_a_sequence_that_fits_alone_is_never_failed_for_room(squeeze):
    """The first sequence's last token takes the pool's last free cell in the first half of
    a split batch; its KV goes as it finishes, so the second half finds room again. (Before,
    finished sequences held their cells to the step's end and the second one was failed
    as "no KV cache room ... even alone" though it fits alone.)"""
    m, params, r = squeeze.model, squeeze.params, squeeze.result
    assert r.stats.decode_retries >= 1, r.stats  # the squeeze happened
    assert r[0].finish_reason == "length" and len(r[0].token_ids) == params[0].max_tokens
    assert r[1].finish_reason == "length" and r[1].error is None, r[1]
    assert len(r[1].token_ids) == params[1].max_tokens
    assert r.stats.failed == 0 and r.stats.preemptions == 0, r.stats
    _assert_clean(m)
