"""The Ray Serve router's policy (parallel_gen.ray.routing), without Ray: the hash ring,
the prefix index, the choice between them and the queue-imbalance fallback, and the
routing key read from an HTTP request."""

from __future__ import annotations

import json

import pytest

from conftest import import_extra

import_extra("ray.data", "ray")  # parallel_gen.ray's package needs it; the policy itself does not use Ray

from parallel_gen.ray.routing import AffinityPolicy, HashRing, PrefixIndex, RouteKey, route_key  # noqa: E402

SESSIONS = [f"session-{i}" for i in range(2000)]


def owners(ring, sessions=SESSIONS):
    return {s: ring.ranked(s, 1)[0] for s in sessions}


def test_ring_spreads_sessions_and_is_the_same_in_every_router():
    a, b = HashRing(), HashRing()
    a.update(["r0", "r1", "r2"])
    b.update(["r2", "r0", "r1"])  # another process, another order: the same ring
    assert owners(a) == owners(b)
    counts = {r: list(owners(a).values()).count(r) for r in ("r0", "r1", "r2")}
    assert all(400 < n < 934 for n in counts.values()), counts  # about a third each


def test_scale_up_moves_only_the_new_replicas_share():
    ring = HashRing()
    ring.update(["r0", "r1", "r2", "r3"])
    before = owners(ring)
    ring.update(["r0", "r1", "r2", "r3", "r4"])
    after = owners(ring)
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == "r4" for s in moved)  # a session moves only to the new replica
    assert 0.1 * len(SESSIONS) < len(moved) < 0.3 * len(SESSIONS)  # about 1/5 of them
    ring.update(["r0", "r1", "r2", "r3"])  # and back: each returns to its old replica
    assert owners(ring) == before


def test_scale_down_moves_only_the_removed_replicas_sessions():
    ring = HashRing()
    ring.update(["r0", "r1", "r2"])
    before = owners(ring)
    ring.update(["r0", "r2"])
    after = owners(ring)
    assert all(after[s] == before[s] for s in SESSIONS if before[s] != "r1")
    assert all(after[s] in ("r0", "r2") for s in SESSIONS)


def test_ranked_gives_distinct_fallbacks():
    ring = HashRing(vnodes=10)
    ring.update(["a", "b", "c"])
    for s in SESSIONS[:50]:
        ranked = ring.ranked(s, 3)
        assert sorted(ranked) == ["a", "b", "c"]
    assert ring.ranked("x", 5) == ring.ranked("x", 3)  # no more than there are
    assert HashRing().ranked("x", 2) == []


def test_prefix_index_matches_whole_chunks_of_a_shared_prefix():
    index = PrefixIndex(chunk_chars=8)
    index.insert("a", "0123456789abcdefXYZ")  # two whole chunks, then a partial one
    index.insert("b", "01234567zzzzzzzz")
    m = index.matches("0123456789abcdef and more", ["a", "b", "c"])
    assert m == {"a": 16, "b": 8, "c": 0}
    assert index.matches("z123456789abcdef", ["a", "b"]) == {"a": 0, "b": 0}  # a prefix, not a substring
    index.retain(["b"])
    assert index.matches("0123456789abcdef", ["a", "b"]) == {"a": 0, "b": 8}


def test_prefix_index_is_bounded_per_replica():
    index = PrefixIndex(chunk_chars=4, capacity=10)
    for i in range(20):
        index.insert("a", f"{i:04d}" * 3)
    assert index.size() == 10
    assert index.matches(f"{19:04d}" * 3, ["a"]) == {"a": 12}  # the newest stay
    assert index.matches(f"{0:04d}" * 3, ["a"]) == {"a": 0}


def test_policy_session_goes_to_its_ring_owner_then_fallbacks():
    policy = AffinityPolicy(fallbacks=1)
    policy.update(["r0", "r1", "r2"])
    ranks = policy.choose(RouteKey(session="s1"), ["r0", "r1", "r2"], {})
    assert [len(r) for r in ranks] == [1, 1]
    assert ranks[0][0] == policy.ring.ranked("s1", 1)[0]
    # the owner is not a candidate (full, or gone): the next on the ring
    owner = ranks[0][0]
    others = [r for r in ("r0", "r1", "r2") if r != owner]
    assert policy.choose(RouteKey(session="s1"), others, {})[0][0] == ranks[1][0]


def test_policy_prefers_the_replica_holding_the_prefix():
    policy = AffinityPolicy(chunk_chars=16, min_match_chars=32)
    policy.update(["r0", "r1"])
    history = "You are a helpful assistant. " * 10
    policy.routed(RouteKey(text=history), "r1")
    ranks = policy.choose(RouteKey(text=history + "Next question?"), ["r0", "r1"], {"r0": 0, "r1": 2})
    assert ranks == [["r1"], ["r0", "r1"]]
    # too short a match: no preference, Serve's shortest queue among all
    assert policy.choose(RouteKey(text=history[:20]), ["r0", "r1"], {}) == [["r0", "r1"]]
    assert policy.choose(RouteKey(text="unrelated " * 20), ["r0", "r1"], {}) == [["r0", "r1"]]


def test_policy_gives_up_the_prefix_when_its_queue_is_much_longer():
    policy = AffinityPolicy(chunk_chars=16, min_match_chars=32, imbalance=4)
    policy.update(["r0", "r1"])
    text = "A long shared conversation prefix. " * 10
    policy.routed(RouteKey(text=text), "r0")
    assert policy.choose(RouteKey(text=text), ["r0", "r1"], {"r0": 4, "r1": 0})[0] == ["r0"]  # within 4
    assert policy.choose(RouteKey(text=text), ["r0", "r1"], {"r0": 5, "r1": 0}) == [["r0", "r1"]]


def test_policy_forgets_a_replica_that_is_gone():
    policy = AffinityPolicy(chunk_chars=16, min_match_chars=16)
    policy.update(["r0", "r1"])
    text = "x" * 100
    policy.routed(RouteKey(text=text), "r0")
    policy.update(["r1", "r2"])
    assert policy.choose(RouteKey(text=text), ["r1", "r2"], {}) == [["r1", "r2"]]
    assert policy.choose(RouteKey(session="s"), [], {}) == []


def test_policy_rejects_bad_options():
    with pytest.raises(ValueError, match="imbalance"):
        AffinityPolicy(imbalance=-1)
    with pytest.raises(ValueError, match="vnodes"):
        AffinityPolicy(vnodes=0)
    with pytest.raises(TypeError):
        AffinityPolicy(no_such_option=1)


def test_route_key_from_headers_and_bodies():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "user": "u1"}
    body = json.dumps(chat).encode()
    assert route_key({}, body) == RouteKey("u1", "<system>Be brief.<user>Hi")
    assert route_key({"x-session-id": "h"}, body).session == "h"  # the header first
    both = json.dumps({**chat, "prompt_cache_key": "k"}).encode()
    assert route_key({}, both).session == "k"  # the field meant for it, before user
    assert route_key({}, json.dumps({"prompt": ["a", "b"]}).encode()) == RouteKey(None, "ab")
    responses = {"instructions": "Sys.", "input": [{"role": "user", "content": "Q"}]}
    assert route_key({}, json.dumps(responses).encode()).text == "Sys.<user>Q"
    assert route_key({}, b"not json") == RouteKey()
    assert route_key({}, b"[1, 2]") == RouteKey()
    assert route_key({}, json.dumps({"prompt": "p" * 100}).encode(), max_chars=10).text == "p" * 10
