"""The engine's KV stream table (csrc/streams.hpp) and placement cost model (csrc/placement.hpp),
alone: exact token layouts, no model. The table is checked against a plain Python model of
what it must answer after random sequences of the operations the engine makes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from parallel_gen._native import _core


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Seq:
    tokens: List[int]
    n_past: int
    running: bool = True


@dataclass
class _Stream:
    seq: Optional[_Seq] = None
    entry: List[int] = field(default_factory=list)
    used: int = 0


class Reference:
    """What the table must answer, by brute force."""

    def __init__(self, n: int):
        self.s = [_Stream() for _ in range(n)]
        self.prefix = -1
        self.prefix_tokens: List[int] = []
        self.prefix_n = 0
        self.clock = 0

    def is_free(self, i):
        return self.s[i].seq is None and i != self.prefix

    def held(self, i):
        st = self.s[i]
        if st.seq is not None and st.seq.running:
            return st.seq.tokens[: st.seq.n_past]
        if i == self.prefix:
            return self.prefix_tokens[: self.prefix_n]
        return st.entry

    def lost(self, i):
        h = self.held(i)
        if not self.is_free(i) or not h:
            return 0
        covered = max((_lcp(h, self.held(j)) for j in range(len(self.s)) if j != i), default=0)
        return len(h) - covered

    def keep(self, i, tokens):
        self.s[i].entry = list(tokens)
        self.clock += 1
        self.s[i].used = self.clock

    def touch(self, i):
        self.clock += 1
        self.s[i].used = self.clock

    def longest_n(self, q, cap, free_only):
        ids = [i for i in range(len(self.s)) if not free_only or (self.is_free(i) and self.s[i].entry)]
        return max((min(cap, _lcp(q, self.held(i))) for i in ids), default=0)

    def oldest_entry(self, a=-1, b=-1):
        c = [(st.used, i) for i, st in enumerate(self.s) if st.entry and i != self.prefix and i not in (a, b)]
        return min(c)[1] if c else -1

    def victim(self, avoid, lo, hi, low):
        clean = [i for i in range(len(self.s)) if self.is_free(i) and self.lost(i) == 0 and i != avoid]
        inside = [i for i in clean if lo <= i < hi]
        if inside:
            return min(inside)
        if clean:
            return min(clean) if low else max(clean)
        lossy = [(self.s[i].used, i) for i in range(len(self.s)) if self.is_free(i) and self.lost(i) > 0 and i != avoid]
        return min(lossy)[1] if lossy else -1


def _agree(t, ref: Reference, rng: random.Random):
    assert t.check() == ""
    n = len(ref.s)
    for i in range(n):
        assert t.held(i) == ref.held(i), i
        assert t.entry(i) == ref.s[i].entry, i
        assert t.is_free(i) == ref.is_free(i), i
        assert t.lost(i) == ref.lost(i), (i, ref.held(i))
    assert t.cached_tokens == sum(len(st.entry) for st in ref.s)
    assert t.oldest_entry() == ref.oldest_entry()
    a, b = rng.randrange(-1, n), rng.randrange(-1, n)
    assert t.oldest_entry(a, b) == ref.oldest_entry(a, b)
    for low in (True, False):
        lo = rng.randrange(-1, n)
        hi = lo + rng.randrange(0, n)
        avoid = rng.randrange(-1, n)
        assert t.victim(avoid, lo, hi, low) == ref.victim(avoid, lo, hi, low)
    for _ in range(3):
        q = _tokens(rng)
        cap = rng.choice([len(q), max(1, len(q) - 2), 3])
        for free_only in (False, True):
            i, k = t.longest(q, cap, free_only)
            assert k == ref.longest_n(q, cap, free_only), (q, cap, free_only)
            if k > 0:  # the stream it names holds that much of the query
                assert min(cap, _lcp(q, ref.held(i))) == k
                assert not free_only or (ref.is_free(i) and ref.s[i].entry)
            else:
                assert i == -1


def _tokens(rng: random.Random) -> List[int]:
    # few distinct tokens and shared starts: long common prefixes, duplicates and ties
    stem = rng.choice([[1, 2, 3, 4], [1, 2, 5], [7], []])
    return stem + [rng.randrange(1, 4) for _ in range(rng.randrange(0, 6))]


def _random_op(t, ref: Reference, rng: random.Random):
    n = len(ref.s)
    i = rng.randrange(n)
    st = ref.s[i]
    op = rng.randrange(11)
    if op == 0 and ref.is_free(i):  # admission: the stream's entry goes (fill), a sequence comes
        toks = _tokens(rng) or [9]
        past = rng.randrange(0, len(toks) + 1)
        if st.entry:
            t.drop(i)
            st.entry = []
        t.occupy(i, toks, past)
        st.seq = _Seq(toks, past)
    elif op == 1 and st.seq is not None and st.seq.running:  # decodes (seen at sync)
        more = [rng.randrange(1, 4) for _ in range(rng.randrange(1, 3))]
        t.decode(i, more)
        st.seq.tokens = st.seq.tokens[: st.seq.n_past] + more
        st.seq.n_past = len(st.seq.tokens)
    elif op == 2 and st.seq is not None and st.seq.running:  # finishes
        keep = rng.random() < 0.8
        t.finish(i, keep)
        if keep:
            ref.keep(i, st.seq.tokens[: st.seq.n_past])
        st.seq.running = False
    elif op == 3 and st.seq is not None:  # leaves its slot
        t.release(i)
        st.seq = None
    elif op == 4 and ref.is_free(i):
        toks = _tokens(rng)
        t.keep(i, toks)
        ref.keep(i, toks)
    elif op == 5:
        t.drop(i)
        st.entry = []
    elif op == 6 and st.entry:
        t.touch(i)
        ref.touch(i)
    elif op == 7 and ref.is_free(i):  # close_gaps keeps a hole's entry elsewhere
        j = rng.randrange(n)
        if j != i and ref.is_free(j):
            t.move_entry(i, j)
            ref.s[j].entry, ref.s[j].used = st.entry, st.used
            st.entry = []
    elif op == 8 and st.seq is not None:  # close_gaps moves a sequence into a hole
        j = rng.randrange(n)
        if ref.is_free(j) and not ref.s[j].entry:
            t.move_seq(i, j)
            ref.s[j].seq, st.seq = st.seq, None
    elif op == 9 and ref.prefix < 0 and ref.is_free(i) and not st.entry:
        toks = [1, 2, 3, 4] + [rng.randrange(1, 4) for _ in range(3)]
        k = rng.randrange(0, len(toks) + 1)
        t.set_prefix(i, toks, k)
        ref.prefix, ref.prefix_tokens, ref.prefix_n = i, toks, k
    elif op == 10 and ref.prefix >= 0:
        if ref.prefix_n < len(ref.prefix_tokens) and rng.random() < 0.6:
            ref.prefix_n += 1
            t.prefix_decoded(ref.prefix_n)
        else:
            t.clear_prefix()
            ref.prefix = -1
    t.sync()


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_agree_with_a_reference_model(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 5, 9])
    t, ref = _core.StreamTable(n), Reference(n)
    for _ in range(250):
        _random_op(t, ref, rng)
        _agree(t, ref, rng)


def test_longest_prefix_names_the_stream_holding_it():
    t = _core.StreamTable(4)
    t.keep(0, [1, 2, 3])
    t.keep(1, [1, 2, 3, 4, 5])
    t.keep(2, [1, 9])
    t.occupy(3, [1, 2, 3, 4, 5, 6, 7], 7)
    assert t.longest([1, 2, 3, 4, 5, 6, 8]) == (3, 6)  # a running sequence: a copy source
    assert t.longest([1, 2, 3, 4, 5, 6, 8], free_only=True) == (1, 5)  # in place: free streams only
    assert t.longest([1, 2, 3, 4, 5, 6, 8], cap=4, free_only=True)[1] == 4
    assert t.longest([1, 9, 9]) == (2, 2)
    assert t.longest([8]) == (-1, 0)
    assert t.longest([]) == (-1, 0)


def test_a_running_sequence_is_indexed_by_what_it_decoded_at_sync():
    t = _core.StreamTable(2)
    t.occupy(0, [5, 6], 2)
    t.decode(0, [7, 8])
    assert t.longest([5, 6, 7, 8, 9]) == (0, 2)  # the index lags until sync...
    assert "index" in t.check()  # ...and check() says so
    t.sync()
    assert t.longest([5, 6, 7, 8, 9]) == (0, 4)
    assert t.check() == ""


def test_ties_between_equal_streams_name_one_of_them_and_lose_nothing():
    t = _core.StreamTable(3)
    t.keep(0, [1, 2, 3])
    t.keep(2, [1, 2, 3])
    i, k = t.longest([1, 2, 3, 4])
    assert k == 3 and i in (0, 2)
    assert t.lost(0) == t.lost(2) == 0  # each holds what the other holds
    t.drop(2)
    assert t.lost(0) == 3


def test_losses_count_tokens_no_other_stream_holds():
    t = _core.StreamTable(3)
    t.keep(0, [1, 2, 3, 4, 5])
    t.keep(1, [1, 2])
    assert (t.lost(0), t.lost(1)) == (3, 0)
    t.occupy(2, [1, 2, 3, 4, 9], 4)  # a running sequence holds [1, 2, 3, 4]
    assert t.lost(0) == 1
    assert t.lost(2) == 0  # not free: nothing lost, it cannot be taken


def test_victims_lose_nothing_first_then_least_recently_used():
    t = _core.StreamTable(4)
    t.keep(0, [1, 2, 3])
    t.keep(1, [4, 5])
    t.keep(2, [6])
    t.keep(3, [1, 2])  # held by stream 0 too: taking it loses nothing
    assert t.victim() == 3
    t.drop(3)
    t.occupy(3, [8], 1)
    assert t.victim() == 0  # the oldest of the lossy ones
    t.touch(0)
    assert t.victim() == 1
    assert t.victim(avoid=1) == 2
    t.touch(1)
    t.touch(2)
    assert [t.oldest_entry(), t.oldest_entry(0), t.oldest_entry(0, 1)] == [0, 1, 2]


def test_victims_that_lose_nothing_prefer_the_live_window_then_the_end_asked_for():
    t = _core.StreamTable(6)
    t.occupy(0, [1], 1)
    t.occupy(1, [2], 1)
    assert t.victim(lo=0, hi=3) == 2  # joins the live ids
    assert t.victim(lo=-1, hi=-1, low=True) == 2
    assert t.victim(lo=-1, hi=-1, low=False) == 5  # a shared prefix: out of their way
    assert t.victim(avoid=2, lo=0, hi=3) == 3


def test_the_prefix_stream_is_never_a_victim_nor_evicted_while_in_use():
    t = _core.StreamTable(3)
    t.set_prefix(1, [1, 2, 3, 4], 2)
    t.keep(0, [9, 9])
    t.keep(2, [8])
    assert not t.is_free(1)
    assert t.held(1) == [1, 2]
    t.prefix_decoded(4)
    assert t.held(1) == [1, 2, 3, 4] and t.longest([1, 2, 3, 4, 5]) == (1, 4)
    for _ in range(3):
        t.touch(0)
        t.touch(2)
        assert t.victim(low=False) != 1 and t.victim(low=True) != 1
        assert t.oldest_entry() != 1
    assert t.victim(avoid=0) == 2 and t.victim(avoid=2) == 0
    t.clear_prefix()
    assert t.is_free(1) and t.victim() == 1  # empty once its owner is done: loses nothing
    assert t.check() == ""


def test_a_freed_stream_is_reused():
    t = _core.StreamTable(1)
    t.occupy(0, [1, 2, 3], 3)
    assert t.victim() == -1  # nothing free
    t.finish(0, keep=True)
    assert t.entry(0) == [1, 2, 3] and t.cached_tokens == 3 and not t.is_free(0)
    assert t.oldest_entry() == 0  # a finished sequence's entry can go before its slot is freed
    t.release(0)
    assert t.is_free(0) and t.victim() == 0 and t.lost(0) == 3
    t.drop(0)
    t.occupy(0, [4], 1)
    assert t.held(0) == [4] and t.check() == ""


def test_misuse_is_refused():
    t = _core.StreamTable(2)
    t.keep(0, [1])
    with pytest.raises(RuntimeError, match="entry"):
        t.occupy(0, [1, 2], 1)  # its entry must go first (the engine's fill)
    t.occupy(1, [3], 1)
    with pytest.raises(RuntimeError, match="taken"):
        t.occupy(1, [3], 1)
    with pytest.raises(RuntimeError, match="prefix"):
        t.set_prefix(1, [1], 1)
    with pytest.raises(ValueError):
        t.occupy(0, [1], 2)
    with pytest.raises(ValueError):
        t.decode(0, [1])  # no sequence there
    with pytest.raises(IndexError):
        t.keep(5, [1])


# -- the cost model ---------------------------------------------------------------------


def test_place_value_counts_tokens_saved_net_of_their_cost():
    v = _core.place_value
    assert v({"kv_from": "nothing", "lost": 5, "gap": 16}) == -21
    assert v({"kv_from": "in_place", "reuse": 100, "lost": 30}) == 70
    assert v({"kv_from": "copy", "reuse": 100}) == 100 - 16  # a whole-stream copy
    assert v({"kv_from": "copy", "reuse": 100}, unified=True) == 99  # unified: cells gain a seq id
    assert v({"kv_from": "host", "reuse": 640}) == 640 - 4 - 10  # fixed part + 1/64 per token
    with pytest.raises(ValueError, match="kv source"):
        v({"kv_from": "disk"})


def test_place_choice_takes_the_option_worth_most_first_on_ties():
    c = _core.place_choice
    decode = {"kv_from": "nothing"}
    copy10 = {"kv_from": "copy", "reuse": 10}  # shorter than a copy is worth: decoding wins
    assert c([decode, copy10]) == 0
    assert c([decode, {"kv_from": "copy", "reuse": 17}]) == 1
    # in place beats a copy of the same tokens, unless it loses what the copy keeps
    in_place = {"kv_from": "in_place", "reuse": 50}
    assert c([{"kv_from": "copy", "reuse": 50}, in_place]) == 1
    assert c([{"kv_from": "copy", "reuse": 50}, dict(in_place, lost=20)]) == 0
    # host memory restores more than any stream holds
    assert c([decode, {"kv_from": "copy", "reuse": 40}, {"kv_from": "host", "reuse": 200}]) == 2
    # moves to keep the live ids together count
    assert c([dict(in_place, gap=16), {"kv_from": "in_place", "reuse": 40}]) == 1
    assert c([in_place, dict(in_place)]) == 0  # equal worth: the first
    assert c([]) == -1


# -- the table inside a running engine --------------------------------------------------


def test_the_engines_table_stays_consistent_while_it_runs(smollm2_path):
    """Shared prefixes, cache hits, more prompts than slots, n samples and cancellations on a
    real model: checked between steps, while sequences run, and after."""
    import threading

    import parallel_gen as pg

    base = "You are a careful annotator. Classify the sentiment of the review below. " * 2
    prompts = [f"{base}Review: {r}" for r in ("I loved it.", "Terrible.", "Fine I guess.", "Best pizza!")] * 3
    prompts += [f"Unrelated prompt number {i}." for i in range(6)]
    with pg.Model(smollm2_path, n_parallel=4, n_ctx=256) as m:
        engine = m._require_runner().run_on_engine
        results, checks = [], []

        def work():
            results.append(pg.generate_parallel(m, prompts, max_tokens=6, temperature=0, ignore_eos=True))
            results.append(pg.generate_parallel(m, prompts[:3], n=3, max_tokens=4, temperature=0.7, seed=1))

        t = threading.Thread(target=work)
        t.start()
        while t.is_alive():
            checks.append(engine(lambda e: (e.check_streams(), e.n_live)))
        t.join()
        checks.append(engine(lambda e: (e.check_streams(), e.n_live)))
        assert [why for why, _ in checks if why] == []
        assert sum(1 for _, live in checks if live > 0) >= 3  # some checks saw sequences running
        assert results[0].stats.failed == 0 and results[0].stats.cached_prompt_tokens > 0
        assert results[0].stats.prefix_tokens_reused + results[0].stats.cached_prompt_tokens > 0
        assert m.stats().kv_tokens_cached > 0
