"""The prompt cache's host-memory tier (ModelConfig.cache_ram): a KV stream's cache entry
is saved to host memory before the stream is reused, and restored for a later prompt.

The first tests drive the tier's bookkeeping (budget, LRU, prefix-awareness, the block
index) through the native HostCache with opaque states; the others run SmolLM2 with one
slot (two KV streams), so a third distinct prompt pushes the first one out of the streams.
"""

from __future__ import annotations

import struct
import time

import pytest

import parallel_gen as pg
from parallel_gen import ParamError
from parallel_gen._native import _core

GREEDY = dict(temperature=0, ignore_eos=True)
# Three sessions with nothing in common from their first token on (no stream can give
# another session's prefix), each ~120 tokens.
TOPICS = ["Astronomy", "Cooking", "Gardening"]
SESSIONS = [f"{t}: " + f"{t.lower()} is a subject worth studying in detail, and here is why. " * 8 for t in TOPICS]
FOLLOW_UP = " Now summarise that in one line:"
MIB = 2**20


def _engine(model, fn):
    return model._require_runner().run_on_engine(fn)


def _ids(result):
    return [c.token_ids for c in result]


# -- the bookkeeping alone -----------------------------------------------------------------------

def test_host_cache_longest_prefix_through_the_block_index():
    h = _core.HostCache(1 << 20, 4)
    a = list(range(100, 110))  # 10 tokens: two whole blocks
    assert h.put(a, b"x" * 10) == "stored"
    assert h.longest(a + [7, 8]) == (0, 10)
    assert h.longest(a[:6] + [0] * 6) == (0, 6)  # past the last shared block, token by token
    assert h.longest(a, 7) == (0, 7)  # at most cap
    assert h.longest(a[:3]) == (-1, 0)  # shorter than a block: not worth a restore
    assert h.longest([1] + a[1:]) == (-1, 0)  # the first block differs
    assert h.put([1, 2, 3], b"x") == "too_large"  # shorter than a block


def test_host_cache_stores_no_entry_twice():
    h = _core.HostCache(1 << 20, 4)
    long = list(range(20))
    assert h.put(long[:8], b"s" * 8) == "stored"
    assert h.put(long[:12], b"s" * 12) == "stored"  # contains the first: that one goes
    assert len(h) == 1 and h.tokens(h.ids()[0]) == long[:12]
    assert h.put(long[:9], b"s" * 9) == "held"  # the 12-token entry holds all of it
    assert len(h) == 1 and h.bytes == 12 + 12 * 4
    assert h.put(long[:4] + [99] * 8, b"t" * 12) == "stored"  # shares a block, then departs: both kept
    assert len(h) == 2
    assert h.longest(long) == (h.ids()[0], 12)


def test_host_cache_evicts_least_recently_used_within_its_budget():
    entry = 100 + 8 * 4  # state bytes + tokens
    h = _core.HostCache(3 * entry, 4)
    keys = [[k] * 8 for k in range(5)]
    for k in keys[:3]:
        assert h.put(k, b"z" * 100) == "stored"
    assert h.bytes == 3 * entry and h.evictions == 0
    first = h.longest(keys[0])[0]
    h.touch(first)  # now keys[1] is the least recently used
    assert h.put(keys[3], b"z" * 100) == "stored"
    assert h.evictions == 1 and h.bytes <= h.budget
    assert h.longest(keys[1]) == (-1, 0) and h.longest(keys[0])[1] == 8
    assert h.put(keys[4], b"z" * (3 * entry)) == "too_large"  # never beyond the budget
    assert h.bytes <= h.budget and len(h) == 3


def test_cache_ram_is_validated():
    with pytest.raises(ParamError) as e:
        pg.ModelConfig(cache_ram=-1)
    assert e.value.field == "cache_ram"
    assert pg.ModelConfig(prompt_cache=False).cache_ram == 0  # the tier belongs to the prompt cache
    assert pg.ModelConfig(batch_invariant=True).cache_ram == 0


# -- on a model ------------------------------------------------------------------------------------

def _run(m, prompt, **kw):
    return pg.generate_parallel(m, prompt, max_tokens=12, logprobs=2, **GREEDY, **kw)


def _follow_up(m, first):
    return SESSIONS[0] + first[0].text + FOLLOW_UP


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """The second turn of session 0 with its first turn still in a KV stream (no host tier)."""
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=0) as m:
        first = _run(m, SESSIONS[0])
        second = _run(m, _follow_up(m, first))
        assert second.stats.prompt_cache_hits == 1 and second.stats.host_cache_hits == 0
        return first, second


def test_a_session_pushed_out_of_its_stream_is_restored_from_host_memory(smollm2_path, reference):
    ref_first, ref_second = reference
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=64) as m:
        assert _engine(m, lambda e: (e.n_streams, e.host_budget)) == (2, 64 * MIB)
        first = _run(m, SESSIONS[0])
        assert _ids(first) == _ids(ref_first)
        for other in SESSIONS[1:]:  # two more sessions: session 0's stream is taken
            _run(m, other)
        st = m.stats()
        assert st.host_cache_saves >= 1 and st.host_cache_entries >= 1
        assert 0 < st.host_cache_bytes <= 64 * MIB
        assert st.host_tokens_cached >= len(m.tokenize(SESSIONS[0]))
        second = _run(m, _follow_up(m, first))
        s = second.stats
        assert s.host_cache_hits == 1 and s.prompt_cache_hits == 1
        assert s.host_cached_tokens == s.cached_prompt_tokens == ref_second.stats.cached_prompt_tokens > 100
        # the restored KV is the very KV the stream held: the same output, token for token
        assert _ids(second) == _ids(ref_second)
        assert [t.logprob for t in second[0].outputs[0].logprobs] == pytest.approx(
            [t.logprob for t in ref_second[0].outputs[0].logprobs], abs=1e-4)
        assert _engine(m, lambda e: e.kv_tokens) == 0
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=0) as off:
        _run(off, SESSIONS[0])
        for other in SESSIONS[1:]:
            _run(off, other)
        missed = _run(off, _follow_up(off, first))
        assert missed.stats.cached_prompt_tokens == 0 and missed.stats.host_cache_hits == 0  # the build before


def test_the_budget_holds_under_a_flood_of_distinct_prompts(smollm2_path):
    """A 4 MiB tier (~180 SmolLM2 tokens of KV: three of these entries) under 24 distinct
    ~50-token prompts: entries are saved, the least recently used go, and the tier never
    holds more than its budget."""
    prompts = [f"Prompt {i} about item {i * 7919 % 1000}: " + f"detail {i} " * 12 for i in range(24)]
    with pg.Model(smollm2_path, n_parallel=2, n_ctx=256, cache_ram=4) as m:
        held = []
        for k in range(0, len(prompts), 2):
            r = pg.generate_parallel(m, prompts[k:k + 2], max_tokens=4, **GREEDY)
            assert r.stats.failed == 0
            st = m.stats()
            held.append(st.host_cache_bytes)
            assert st.host_cache_bytes <= 4 * MIB
        st = m.stats()
        assert st.host_cache_saves >= 15 and st.host_cache_evictions >= 10
        assert st.host_cache_entries >= 2 and max(held) > 2 * MIB  # it was used, up to its budget
        assert _engine(m, lambda e: e.host_bytes) == st.host_cache_bytes
        # the most recently saved come back from host memory
        hits = sum(pg.generate_parallel(m, p, max_tokens=4, **GREEDY).stats.host_cache_hits
                   for p in reversed(prompts[-6:-2]))
        assert hits >= 1 and m.stats().host_cache_bytes <= 4 * MIB


def _spilled(m):
    """Session 0 run, then pushed into the host tier by the two others; its entries as bytes."""
    first = _run(m, SESSIONS[0])
    for other in SESSIONS[1:]:
        _run(m, other)
    return first, _engine(m, lambda e: e.export_host())


def test_restore_refused_for_another_configuration(smollm2_path, reference):
    ref_first, ref_second = reference
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=64) as m:
        first, entries = _spilled(m)
        assert len(entries) >= 1
    follow = SESSIONS[0] + first[0].text + FOLLOW_UP
    # Another KV type, another context layout: nothing is taken, and nothing is restored.
    for other in (dict(type_k="q8_0"), dict(n_ctx=256), dict(n_parallel=2)):
        with pg.Model(smollm2_path, **{**dict(n_parallel=1, n_ctx=512, cache_ram=64), **other}) as m:
            assert not any(_engine(m, lambda e: [e.import_host(b) for b in entries]))
            assert m.stats().host_cache_entries == 0
            r = _run(m, follow)
            assert r.stats.host_cache_hits == 0 and r.stats.cached_prompt_tokens == 0
    # The same configuration takes them, and restores the session from them.
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=64) as m:
        assert all(_engine(m, lambda e: [e.import_host(b) for b in entries]))
        r = _run(m, follow)
        assert r.stats.host_cache_hits == 1 and _ids(r) == _ids(ref_second)
    # State whose tag matches but that llama.cpp cannot read (its stream count altered) is
    # refused at restore: the prompt is decoded instead, and the entry dropped.
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=64) as m:
        bad = [_corrupt_stream_count(b) for b in entries]
        assert all(_engine(m, lambda e: [e.import_host(b) for b in bad]))
        r = _run(m, follow)
        assert r.stats.host_cache_hits == 0 and r.stats.cached_prompt_tokens == 0
        assert m.stats().host_cache_entries == len(bad) - 1  # the one tried is dropped
        assert m.stats().host_restore_failures == 1
        assert r.stats.failed == 0 and _ids(r) == _ids(pg.generate_parallel(m, follow, max_tokens=12, logprobs=2,
                                                                             cache_prompt=False, **GREEDY))


def _corrupt_stream_count(packed: bytes) -> bytes:
    """An exported entry (kv_host.cpp HostCache::pack) with llama.cpp's n_stream field (after
    its magic and seq id) changed."""
    at = 8
    (n,) = struct.unpack_from("<Q", packed, at)
    at += 8 + n + 4
    (n,) = struct.unpack_from("<Q", packed, at)
    at += 8 + 4 * n + 8  # tokens, then the state's length
    b = bytearray(packed)
    (streams,) = struct.unpack_from("<I", b, at + 8)
    struct.pack_into("<I", b, at + 8, streams + 1)
    return bytes(b)


def test_cancel_during_a_restore(smollm2_path):
    """A stream whose prompt was restored from host memory is closed right after its
    admission: nothing leaks, the tiers stay consistent, and the session still comes back."""
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, n_batch=16, cache_ram=64) as m:
        first, _ = _spilled(m)
        follow = SESSIONS[0] + first[0].text + FOLLOW_UP
        hits = m.stats().host_cache_hits
        it = pg.stream_parallel(m, follow, max_tokens=12, logprobs=2, **GREEDY)
        deadline = time.time() + 60
        while _engine(m, lambda e: e.n_live) == 0 and time.time() < deadline:  # admitted: restored
            time.sleep(0.001)
        it.close()
        assert m.stats().host_cache_hits == hits + 1
        assert _engine(m, lambda e: (e.kv_tokens, e.n_live)) == (0, 0)
        assert m.stats().active_requests == 0
        for other in SESSIONS[1:]:  # push it out again (from wherever it is now)
            _run(m, other)
        again = _run(m, follow)
        assert again.stats.failed == 0 and again.stats.prompt_cache_hits == 1
        # what the cancelled admission decoded past the restore was kept too: more is cached,
        # and the prefill is cut elsewhere (numerics may move a little: the first step agrees)
        assert again.stats.cached_prompt_tokens >= len(m.tokenize(SESSIONS[0]))
        alone = pg.generate_parallel(m, follow, max_tokens=12, logprobs=2, cache_prompt=False, **GREEDY)
        ref_top = alone[0].outputs[0].logprobs[0]
        got = {t.token_id: t.logprob for t in again[0].outputs[0].logprobs[0].top}
        assert abs(got[ref_top.token_id] - ref_top.logprob) < 0.15
        assert _engine(m, lambda e: e.kv_tokens) == 0


def test_a_restore_whose_entry_the_victims_save_pushes_out(smollm2_path):
    """A tier that holds one session (4 MiB, ~130 tokens each): restoring session 0 needs a
    stream whose own session must be saved first, which takes the only room. The prompt is
    decoded instead: no crash, no wrong KV, the budget kept."""
    with pg.Model(smollm2_path, n_parallel=1, n_ctx=512, cache_ram=4) as m:
        first, _ = _spilled(m)  # session 0 in host memory, 1 and 2 in the streams
        assert m.stats().host_cache_entries == 1
        r = _run(m, _follow_up(m, first))
        assert r.stats.failed == 0 and r.stats.host_cache_hits == 0 and r.stats.cached_prompt_tokens == 0
        st = m.stats()
        assert st.host_cache_entries == 1 and st.host_cache_bytes <= 4 * MIB and st.host_cache_evictions >= 1
        alone = pg.generate_parallel(m, _follow_up(m, first), max_tokens=12, logprobs=2, cache_prompt=False,
                                     **GREEDY)
        assert _ids(r) == _ids(alone)
        assert _engine(m, lambda e: e.kv_tokens) == 0
