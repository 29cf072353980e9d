"""Failure paths: KV exhaustion, fatal decode errors, Ctrl-C, threads, leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import parallel_gen as pg

from conftest import PROMPTS_16, rss_bytes, terminal_sigint


def _idle(model) -> bool:
    """Nothing queued or running, and no KV left in any sequence."""
    s = model.stats()
    kv = model._require_runner().run_on_engine(lambda e: e.kv_tokens)
    return s.slots_busy == 0 and s.queued_prompts == 0 and s.active_requests == 0 and kv == 0


def test_tiny_shared_pool_forces_retries_and_still_finishes_everything(smollm2_path):
    """A shared KV pool far smaller than n_parallel * n_ctx: decode runs out of room,
    retries on split batches, pauses the youngest sequences, and every prompt that fits
    its context still completes with the same greedy text as alone."""
    prompts = [f"Story {i}: once upon a time in a land far away," for i in range(8)]
    # prompt_cache off: cached KV in the pool would make the calls alone retry too (to evict
    # it; test_prompt_cache covers that), and this test is about the recovery path itself
    with pg.Model(smollm2_path, n_parallel=8, n_ctx=128, kv_unified=True, kv_size=256, prompt_cache=False) as m:
        r = pg.generate_parallel(m, prompts, max_tokens=60, temperature=0, ignore_eos=True)
        s = r.stats
        assert s.failed == 0 and all(c.finish_reason == "length" for c in r)
        assert all(len(c.token_ids) == 60 for c in r)
        assert s.decode_retries > 0 and s.fallback_decodes > 0 and s.preemptions > 0, s
        # the same prompts one at a time on the same pool: never short of room
        alone = [pg.generate_parallel(m, p, max_tokens=60, temperature=0, ignore_eos=True) for p in prompts[:3]]
        assert all(a.stats.decode_retries == 0 for a in alone)
        # Recovery is deterministic: the same batch on the same pool pauses the same sequences
        # and gives the same tokens. (Against the prompts alone only the start can be compared,
        # and not reliably: unified KV and recomputed prefills change numerics, and on some
        # CPUs a near-tie flips within 8 tokens.)
        again = pg.generate_parallel(m, prompts, max_tokens=60, temperature=0, ignore_eos=True)
        assert [c.token_ids for c in again] == [c.token_ids for c in r]
        assert again.stats.preemptions == s.preemptions
        for a, c in zip(alone, r):
            assert a[0].token_ids[0] == c.token_ids[0]  # the prompt's own argmax, before any pause


def test_fatal_decode_failure_raises_with_partial_results_and_model_survives(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256) as m:
        prompts = ["Hi", "A long story: " + "once " * 20, "Third", "Fourth"]
        params = [pg.SamplingParams(max_tokens=2, temperature=0)] + [pg.SamplingParams(max_tokens=50,
                                                                                      temperature=0)] * 3
        m._inject_abort(6)  # llama.cpp's abort callback fires in the 6th decode
        with pytest.raises(pg.GenerationError, match="aborted") as ei:
            pg.generate_parallel(m, prompts, params)
        done = ei.value.results
        assert [c.index for c in done] == [0]  # only the short one finished before the abort
        assert done[0].finish_reason == "length" and len(done[0].token_ids) == 2
        assert _idle(m)
        # the Model is still usable and its KV is clean: same results as a fresh model
        again = pg.generate_parallel(m, prompts, params)
        with pg.Model(smollm2_path, n_parallel=2, n_ctx=256) as fresh:
            ref = pg.generate_parallel(fresh, prompts, params)
        assert [c.token_ids for c in again] == [c.token_ids for c in ref]


CTRL_C_CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time, parallel_gen as pg
    m = pg.Model(sys.argv[1], n_parallel=8, n_ctx=1024)
    sent = []

    def ctrl_c():  # Ctrl-C once generation is well under way, noting the decode calls so far
        while m.stats().tokens_generated < 64:
            time.sleep(0.01)
        sent.append(m.stats().decode_calls)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # as a terminal's Ctrl-C

    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        pg.generate_parallel(m, ["Write a long essay about the ocean."] * 32, max_tokens=1000,
                             temperature=0, ignore_eos=True)
        print("finished-unexpectedly", flush=True)
    except KeyboardInterrupt:
        print("interrupted", m.stats().decode_calls - sent[0], flush=True)
    s = m.stats()
    assert s.slots_busy == 0 and s.queued_prompts == 0 and s.active_requests == 0, s
    assert m._require_runner().run_on_engine(lambda e: e.kv_tokens) == 0
    r = pg.generate_parallel(m, ["Hello"], max_tokens=4, temperature=0)
    print("usable", len(r[0].token_ids), flush=True)
    """
)


def test_ctrl_c_stops_within_a_step_and_model_stays_usable(smollm2_path, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CTRL_C_CHILD)
    p = subprocess.Popen([sys.executable, str(script), str(smollm2_path)], stdout=subprocess.PIPE, text=True,
                         preexec_fn=terminal_sigint)
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        p.kill()
    lines = out.split("\n")
    assert lines[0].startswith("interrupted"), out
    # Counted in decode steps, not seconds (a loaded machine stretches seconds): the call
    # stops within a few steps of Ctrl-C, where finishing the 32 x 1000 tokens on 8 slots
    # would take 4,000.
    assert int(lines[0].split()[1]) <= 16, out
    assert lines[1].startswith("usable") and p.returncode == 0, out


def test_two_threads_on_one_model_get_their_own_results(smol):
    a_prompts, b_prompts = PROMPTS_16[:8], PROMPTS_16[8:]
    ref_a = pg.generate_parallel(smol, a_prompts, max_tokens=12, temperature=0)
    ref_b = pg.generate_parallel(smol, b_prompts, max_tokens=12, temperature=0)
    got = {}
    errors = []

    def worker(name, prompts):
        try:
            for k in range(3):
                got[(name, k)] = pg.generate_parallel(smol, prompts, max_tokens=12, temperature=0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=("a", a_prompts)),
               threading.Thread(target=worker, args=("b", b_prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for k in range(3):
        assert [c.token_ids for c in got[("a", k)]] == [c.token_ids for c in ref_a]
        assert [c.token_ids for c in got[("b", k)]] == [c.token_ids for c in ref_b]
        assert [c.prompt for c in got[("b", k)]] == b_prompts


def test_200_calls_do_not_grow_memory(smol):
    def call(i):
        r = pg.generate_parallel(smol, [f"Call {i}: hello", "and a second prompt"], max_tokens=3, temperature=0.7,
                                 seed=i, stop=["\n"])
        assert len(r) == 2

    for i in range(20):
        call(i)
    before = rss_bytes()
    for i in range(200):
        call(i)
    grown = rss_bytes() - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 calls"


def test_fatal_error_during_a_stream(smollm2_path):
    """llama.cpp fails while a stream runs: the iterator raises GenerationError after
    the events it already gave, frees everything, and the Model stays usable."""
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256) as m:
        ref = pg.generate_parallel(m, PROMPTS_16[:3], max_tokens=40, temperature=0, ignore_eos=True)
        m._inject_abort(8)  # the 8th decode from now fails
        events = []
        it = pg.stream_parallel(m, PROMPTS_16[:3], max_tokens=40, temperature=0, ignore_eos=True)
        with pytest.raises(pg.GenerationError, match="llama.cpp failed while decoding.*aborted"):
            for ev in it:
                events.append(ev)
        assert events and not any(ev.finished for ev in events)  # 40 tokens each: none could finish
        # what was streamed before the failure is the start of the right answer
        got = {}
        for ev in events:
            got.setdefault(ev.index, []).extend(ev.token_ids)
        for i, toks in got.items():
            assert toks == ref[i].token_ids[: len(toks)]
        with pytest.raises(StopIteration):
            next(it)  # closed: nothing more, no hang
        assert _idle(m)
        again = pg.generate_parallel(m, PROMPTS_16[:3], max_tokens=40, temperature=0, ignore_eos=True)
        assert [c.token_ids for c in again] == [c.token_ids for c in ref]


def test_model_closed_during_a_stream(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256)
    it = pg.stream_parallel(m, PROMPTS_16[:3], max_tokens=200, temperature=0, ignore_eos=True)
    first = next(it)
    assert not first.finished
    m.close()
    with pytest.raises(pg.GenerationError, match="the Model was closed"):
        for _ in it:  # events already queued may come first; then the error, not a hang
            pass
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # closing after the Model is gone is harmless
    with pytest.raises(RuntimeError, match="closed"):
        pg.stream_parallel(m, ["Hi"], max_tokens=2)


def test_model_closed_during_an_async_stream(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256)

    async def consume():
        it = pg.astream_parallel(m, PROMPTS_16[:2], max_tokens=200, temperature=0, ignore_eos=True)
        await it.__anext__()
        m.close()
        with pytest.raises(pg.GenerationError, match="the Model was closed"):
            async for _ in it:
                pass
        await it.aclose()

    asyncio.run(consume())
