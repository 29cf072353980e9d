"""One engine per Model shared by many callers: threads, streams, asyncio, cache."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time

import pytest

import parallel_gen as pg

from conftest import PROMPTS_16
from parallel_gen.stream import WHOLE

GREEDY = dict(max_tokens=10, temperature=0, ignore_eos=True)


def _kv_left(model) -> int:
    return model._require_runner().run_on_engine(lambda e: e.kv_tokens)


def _tokens(result):
    return [[o.token_ids for o in c.outputs] for c in result]


def test_eight_threads_mixed_calls_each_equal_to_alone(smol):
    jobs = []
    for t in range(8):
        prompts = PROMPTS_16[(2 * t) % 16: (2 * t) % 16 + 1 + t % 3]
        if t % 4 == 3:
            jobs.append(("chat", [[{"role": "user", "content": p}] for p in prompts]))
        elif t % 4 == 2:
            jobs.append(("stream", prompts))
        else:
            jobs.append(("generate", prompts))

    def run(kind, payload):
        if kind == "chat":
            return _tokens(pg.chat_parallel(smol, payload, max_tokens=10, temperature=0))
        if kind == "stream":
            got = {}
            for ev in pg.stream_parallel(smol, payload, **GREEDY):
                got.setdefault(ev.index, []).extend(ev.token_ids)
            return [[got[i]] for i in range(len(payload))]
        return _tokens(pg.generate_parallel(smol, payload, **GREEDY))

    alone = [run(kind, payload) for kind, payload in jobs]
    results, errors = [None] * len(jobs), []

    def worker(k):
        try:
            for _ in range(2):
                results[k] = run(*jobs[k])
                assert results[k] == alone[k], (k, jobs[k])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert results == alone
    s = smol.stats()
    assert s.active_requests == 0 and s.slots_busy == 0 and _kv_left(smol) == 0


def test_stream_events_add_up_to_the_batch_result(smol):
    prompts = ["Write a haiku about rain.", "List three colours:", "1, 2, 3,"]
    ref = pg.generate_parallel(smol, prompts, max_tokens=24, temperature=0, stop=["\n\n"])
    text, tokens, final = {}, {}, {}
    for ev in pg.stream_parallel(smol, prompts, max_tokens=24, temperature=0, stop=["\n\n"]):
        assert ev.index not in final, "no event after the final one"
        text[ev.index] = text.get(ev.index, "") + ev.text
        tokens.setdefault(ev.index, []).extend(ev.token_ids)
        if ev.finished:
            final[ev.index] = ev
    for i, c in enumerate(ref):
        assert text[i] == c.text and tokens[i] == c.token_ids
        assert final[i].finish_reason == c.finish_reason and final[i].stop_reason == c.stop_reason


def test_stream_events_carry_their_tokens_logprobs(smol):
    kw = dict(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    ref = pg.generate_parallel(smol, PROMPTS_16[:2], **kw)
    events = list(pg.stream_parallel(smol, PROMPTS_16[:2], **kw))
    assert sum(1 for ev in events if not ev.finished and ev.token_ids) >= 4  # logprobs arrive as tokens do
    got = {}
    for ev in events:
        assert ev.logprobs is not None and [t.token_id for t in ev.logprobs] == ev.token_ids
        got.setdefault(ev.index, []).extend(ev.logprobs)
    for i, c in enumerate(ref):
        assert got[i] == c.outputs[0].logprobs and len(got[i]) == 12
    plain = list(pg.stream_parallel(smol, PROMPTS_16[:1], max_tokens=3, temperature=0))
    assert plain and all(ev.logprobs is None for ev in plain)


@pytest.mark.parametrize("interval", [1, 4, 7, WHOLE])
def test_a_stream_interval_sends_the_same_tokens_in_fewer_events(smol, interval):
    """Every ``interval`` tokens an event, the first token at once (time to first token),
    what is left with the finished one: the texts, tokens and logprobs of every token."""
    n = 14
    kw = dict(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
    ref = pg.generate_parallel(smol, PROMPTS_16[:3], **kw)
    events = list(pg.stream_parallel(smol, PROMPTS_16[:3], stream_interval=interval, **kw))
    step = min(interval, n)
    expected = [1] + [step] * ((n - 1) // step) + ([(n - 1) % step] if (n - 1) % step else [])
    for i, c in enumerate(ref):
        mine = [ev for ev in events if ev.index == i]
        sizes = [len(ev.token_ids) for ev in mine]
        # the last event may be the finish alone, when the tokens came out even
        assert sizes in (expected, expected + [0]), (sizes, expected)
        assert mine[-1].finished and not any(ev.finished for ev in mine[:-1])
        assert "".join(ev.text for ev in mine) == c.text
        assert [t for ev in mine for t in ev.token_ids] == c.token_ids
        assert [lp for ev in mine for lp in ev.logprobs] == c.outputs[0].logprobs


def test_an_async_stream_interval_and_bad_intervals(smol, tmp_path):
    async def consume():
        return [ev async for ev in pg.astream_parallel(smol, PROMPTS_16[:2], stream_interval=5, **GREEDY)]

    events = asyncio.run(consume())
    assert ["".join(ev.text for ev in events if ev.index == i) for i in range(2)] == \
        pg.generate_parallel(smol, PROMPTS_16[:2], **GREEDY).texts
    assert max(len(ev.token_ids) for ev in events) == 5
    # A stop string held back across a delta's end is cut the same way.
    stops = dict(max_tokens=40, temperature=0, stop=[".", " and"])
    ref = pg.generate_parallel(smol, PROMPTS_16[:4], **stops)
    events = list(pg.stream_parallel(smol, PROMPTS_16[:4], stream_interval=3, **stops))
    for i, c in enumerate(ref):
        mine = [ev for ev in events if ev.index == i]
        assert "".join(ev.text for ev in mine) == c.text and mine[-1].stop_reason == c.stop_reason
    assert any(c.stop_reason is not None for c in ref)
    # Refused with the field named, before any model opens (the path does not exist).
    for bad, kind in ((0, pg.ParamError), (-3, pg.ParamError), (WHOLE + 1, pg.ParamError),
                      (2.0, pg.ParamTypeError), (True, pg.ParamTypeError)):
        with pytest.raises(kind) as e:
            pg.stream_parallel(tmp_path / "none.gguf", ["Hi"], stream_interval=bad)
        assert e.value.field == "stream_interval"
        with pytest.raises(kind):
            pg.astream_parallel(smol, ["Hi"], stream_interval=bad)


def test_stream_cancelled_halfway_leaves_no_kv(smol):
    before = smol.stats().tokens_generated
    it = pg.stream_parallel(smol, PROMPTS_16[:6], max_tokens=400, temperature=0, ignore_eos=True)
    seen = [next(it) for _ in range(12)]
    assert all(not ev.finished for ev in seen)
    it.close()
    s = smol.stats()
    assert s.active_requests == 0 and s.slots_busy == 0 and s.queued_prompts == 0
    assert _kv_left(smol) == 0
    assert s.tokens_generated - before < 6 * 400 / 2  # stopped early, not run to the end
    # the next call works and is unaffected
    r = pg.generate_parallel(smol, PROMPTS_16[:2], **GREEDY)
    assert _tokens(r) == _tokens(pg.generate_parallel(smol, PROMPTS_16[:2], **GREEDY))


def test_abandoned_stream_is_cancelled(smol):
    it = pg.stream_parallel(smol, PROMPTS_16[:4], max_tokens=400, temperature=0, ignore_eos=True)
    next(it)
    del it  # dropped without close(): cancelled all the same
    deadline = time.time() + 30
    while smol.stats().active_requests and time.time() < deadline:
        time.sleep(0.05)
    assert smol.stats().active_requests == 0 and _kv_left(smol) == 0


def test_asyncio_consumer(smol):
    prompts = PROMPTS_16[:4]
    ref = pg.generate_parallel(smol, prompts, **GREEDY)

    async def consume():
        got = {}
        async for ev in pg.astream_parallel(smol, prompts, **GREEDY):
            got[ev.index] = got.get(ev.index, "") + ev.text
            await asyncio.sleep(0)  # the loop stays free while tokens arrive
        return got

    async def cancel_early():
        it = pg.astream_parallel(smol, prompts, max_tokens=400, temperature=0, ignore_eos=True)
        async for _ in it:
            break
        await it.aclose()

    got = asyncio.run(consume())
    assert [got[i] for i in range(4)] == ref.texts
    asyncio.run(cancel_early())
    assert smol.stats().active_requests == 0 and _kv_left(smol) == 0


def test_many_streams_wake_their_event_loop_once_per_engine_step(smol):
    """Eight one-prompt streams (eight requests, as eight server clients): the engine hands
    each step's events to the loop in one wakeup, not one per event."""
    prompts = PROMPTS_16[:8]
    ref = pg.generate_parallel(smol, prompts, **GREEDY)

    class CountingLoop(asyncio.SelectorEventLoop):
        wakeups = 0

        def call_soon_threadsafe(self, *args, **kwargs):
            CountingLoop.wakeups += 1
            return super().call_soon_threadsafe(*args, **kwargs)

    async def one(prompt):
        text = ""
        async for ev in pg.astream_parallel(smol, [prompt], **GREEDY):
            text += ev.text
        return text

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    before = smol.stats().decode_calls
    loop = CountingLoop()
    try:
        texts = loop.run_until_complete(main())
    finally:
        loop.close()
    steps = smol.stats().decode_calls - before
    assert texts == ref.texts
    events = 8 * (GREEDY["max_tokens"] + 1)  # a delta per token, a finish per stream, at least
    # a step's events in one wakeup (steps + 1: the requests' last events, RequestDone);
    # one per event would be >= 88
    assert CountingLoop.wakeups <= steps + 2 < events, (CountingLoop.wakeups, steps)


def test_small_request_is_not_starved_by_a_big_one(smollm2_path):
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=256) as m:
        done = {}

        def big():
            pg.generate_parallel(m, [f"Item {i}:" for i in range(120)], max_tokens=8, temperature=0, ignore_eos=True)
            done["big"] = time.perf_counter()

        t = threading.Thread(target=big)
        t.start()
        while m.stats().tokens_generated == 0:
            time.sleep(0.01)
        pg.generate_parallel(m, PROMPTS_16[:4], max_tokens=8, temperature=0, ignore_eos=True)
        done["small"] = time.perf_counter()
        assert m.stats().active_requests == 1  # the big one is still running
        t.join(timeout=600)
        assert done["small"] < done["big"]


def test_request_ids_and_stats(smol, caplog):
    with caplog.at_level(logging.INFO, logger="parallel_gen"):
        pg.generate_parallel(smol, ["Hi"], max_tokens=2, request_id="job-42")
    assert any("job-42" in r.getMessage() for r in caplog.records)
    s = smol.stats()
    assert s.n_parallel == 8 and s.uptime_seconds > 0 and s.tokens_generated > 0 and s.requests_completed > 0


def test_close_while_another_thread_generates(smollm2_path):
    m = pg.Model(smollm2_path, n_parallel=2, n_ctx=256)
    errors = []

    def long_call():
        try:
            pg.generate_parallel(m, PROMPTS_16[:4], max_tokens=500, temperature=0, ignore_eos=True)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=long_call)
    t.start()
    while m.stats().tokens_generated == 0:
        time.sleep(0.01)
    m.close()
    t.join(timeout=60)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], pg.GenerationError) and "closed" in str(errors[0])
    with pytest.raises(RuntimeError, match="closed"):
        pg.generate_parallel(m, ["Hi"])


# -- result cache ------------------------------------------------------------------------
def test_cache_hit_and_misses(smol, tmp_path):
    cache_dir = tmp_path / "cache"
    prompts = PROMPTS_16[:3]
    first = pg.generate_parallel(smol, prompts, max_tokens=8, temperature=0, cache=cache_dir)
    assert first.stats.cache_hits == 0 and first.stats.decode_calls > 0
    again = pg.generate_parallel(smol, prompts, max_tokens=8, temperature=0, cache=cache_dir)
    assert again.stats.cache_hits == 3 and again.stats.decode_calls == 0
    assert _tokens(again) == _tokens(first) and again.texts == first.texts
    assert [c.index for c in again] == [0, 1, 2]
    # any parameter change is a miss
    for change in (dict(max_tokens=9), dict(stop=["x"]), dict(repeat_penalty=1.1), dict(n=2),
                   dict(temperature=0.5, seed=1), dict(logprobs=1)):
        r = pg.generate_parallel(smol, prompts[:1], **{**dict(max_tokens=8, temperature=0), **change},
                                 cache=cache_dir)
        assert r.stats.cache_hits == 0, change
    # a fixed seed is deterministic: cached; no seed is not
    seeded = [pg.generate_parallel(smol, prompts[:1], max_tokens=8, temperature=0.9, seed=5, cache=cache_dir)
              for _ in range(2)]
    assert seeded[1].stats.cache_hits == 1 and seeded[0].texts == seeded[1].texts
    free = [pg.generate_parallel(smol, prompts[:1], max_tokens=8, temperature=0.9, cache=cache_dir)
            for _ in range(2)]
    assert free[1].stats.cache_hits == 0
    # the order of prompts in a call does not matter; a cached prompt mixes with new ones
    mixed = pg.generate_parallel(smol, [prompts[2], "A new prompt"], max_tokens=8, temperature=0, cache=cache_dir)
    assert mixed.stats.cache_hits == 1 and mixed[0].token_ids == first[2].token_ids


def test_cache_round_trip_of_logprobs_and_samples(smol, tmp_path):
    """A cached answer is the same Completion: every sample, token, logprob and
    alternative, stop reason and text."""
    kw = dict(n=3, logprobs=4, max_tokens=10, temperature=0.9, seed=21, stop=["\n\n"])
    prompts = ["Name three rivers:", "Hello"]
    first = pg.generate_parallel(smol, prompts, cache=tmp_path / "cache", **kw)
    again = pg.generate_parallel(smol, prompts, cache=tmp_path / "cache", **kw)
    assert first.stats.cache_hits == 0 and again.stats.cache_hits == 2 and again.stats.decode_calls == 0
    assert list(again) == list(first)  # dataclass equality, down to each Logprob
    outs = [o for c in again for o in c.outputs]
    assert len(outs) == 6 and len({tuple(o.token_ids) for o in outs[:3]}) > 1  # three different samples
    assert all(len(o.logprobs) == len(o.token_ids) and all(len(t.top) == 4 for t in o.logprobs) for o in outs)
    assert all(isinstance(t.logprob, float) and isinstance(t.top[0], pg.Logprob) for o in outs for t in o.logprobs)


def test_cache_never_crosses_models(smollm2_path, gemma3_path, tmp_path):
    cache = pg.ResultCache(tmp_path / "cache")
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=128) as a:
        pg.generate_parallel(a, ["Hello"], max_tokens=4, temperature=0, cache=cache)
        assert pg.generate_parallel(a, ["Hello"], max_tokens=4, temperature=0, cache=cache).stats.cache_hits == 1
    with pg.Model(gemma3_path, n_parallel=2, n_ctx=128) as b:
        assert pg.generate_parallel(b, ["Hello"], max_tokens=4, temperature=0, cache=cache).stats.cache_hits == 0
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=128, flash_attn=True) as c:  # other numerics
        assert pg.generate_parallel(c, ["Hello"], max_tokens=4, temperature=0, cache=cache).stats.cache_hits == 0
    cache.close()


def test_corrupted_cache_is_set_aside(smol, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    pg.generate_parallel(smol, ["Hello"], max_tokens=4, temperature=0, cache=cache_dir)
    db = cache_dir / "cache.db"
    assert db.exists()
    db.write_bytes(b"\x00garbage, not SQLite\x00" * 500)
    with caplog.at_level(logging.WARNING, logger="parallel_gen"):
        r = pg.generate_parallel(smol, ["Hello"], max_tokens=4, temperature=0, cache=cache_dir)
    assert r.stats.cache_hits == 0 and r[0].completion_tokens > 0
    assert any("unreadable" in rec.getMessage() for rec in caplog.records)
    assert [p for p in os.listdir(tmp_path) if p.startswith("cache.corrupt-")]
    assert pg.generate_parallel(smol, ["Hello"], max_tokens=4, temperature=0, cache=cache_dir).stats.cache_hits == 1


def test_cache_argument_type(smol):
    with pytest.raises(TypeError, match="cache must be"):
        pg.generate_parallel(smol, ["Hi"], cache=42)
