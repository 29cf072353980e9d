"""Which replica a request goes to, so that it finds its KV there: the policy of the
Ray Serve router (:mod:`.serve_router`), free of Ray so it can be tested alone.

1. A request with a session id goes to the session's replica on a consistent-hash ring
   of replica ids: adding or removing a replica moves only the sessions on its arcs
   (about 1/N of them), so the others keep their cached KV.
2. Without one, it goes to the replica whose recent prompts share the longest prefix
   with it (an approximate index of hashed prompt chunks per replica, as SGLang's
   cache-aware router and vLLM's prefix-aware router keep), unless that replica's queue
   is much longer than the shortest one.
3. Otherwise (no match, or load imbalanced): the shortest queue (Serve's own choice).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

SESSION_HEADER = "x-session-id"
"""The request header that names a session (as Ray Serve's ConsistentHashRouter reads it)."""

SESSION_FIELDS = ("prompt_cache_key", "user")
"""Body fields that name a session when there is no header: OpenAI's prompt_cache_key
(meant for exactly this), then user."""


def _hash(text: str) -> int:
    # Stable across processes and runs (unlike hash()): every router builds the same ring.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class RouteKey:
    """What the router knows of a request: its session id, if any, and its prompt as text
    (the messages' contents joined; only prefixes of it matter)."""

    session: Optional[str] = None
    text: str = ""


def route_key(headers: Mapping[str, str], body: bytes, max_chars: int = 16384) -> RouteKey:
    """The routing key of an HTTP request: the session header, else the body's session
    fields; the prompt text of a completions, chat or Responses body (up to ``max_chars``).
    A body that is not a JSON object gives no text (the replica answers it with the error)."""
    session = headers.get(SESSION_HEADER) or None
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return RouteKey(session)
    if session is None:
        for name in SESSION_FIELDS:
            value = doc.get(name)
            if isinstance(value, str) and value:
                session = value
                break
    parts: List[str] = []
    for name in ("instructions", "prompt", "messages", "input"):
        _collect_text(doc.get(name), parts)
    return RouteKey(session, "".join(parts)[:max_chars])


def _collect_text(value: Any, out: List[str]) -> None:
    """Appends the text in a prompt, a list of prompts, messages or content parts."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect_text(item, out)
    elif isinstance(value, dict):
        role = value.get("role")
        if isinstance(role, str):
            out.append(f"<{role}>")  # two conversations with the same texts in other roles differ
        for name in ("content", "text"):
            _collect_text(value.get(name), out)


class HashRing:
    """A consistent-hash ring over replica ids, ``vnodes`` points per replica."""

    def __init__(self, vnodes: int = 100) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes={vnodes!r}: must be >= 1")
        self.vnodes = vnodes
        self._points: List[int] = []
        self._owners: List[str] = []
        self._members: frozenset = frozenset()

    @property
    def members(self) -> frozenset:
        return self._members

    def update(self, replicas: Iterable[str]) -> None:
        members = frozenset(replicas)
        if members == self._members:
            return
        ring = sorted((_hash(f"{r}#{i}"), r) for r in members for i in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]
        self._members = members

    def ranked(self, key: str, count: int) -> List[str]:
        """The key's owner, then the next distinct replicas clockwise (``count`` at most):
        where the key goes if its owner cannot take it."""
        if not self._points:
            return []
        start = bisect.bisect_right(self._points, _hash(key))
        out: List[str] = []
        for k in range(len(self._points)):
            owner = self._owners[(start + k) % len(self._points)]
            if owner not in out:
                out.append(owner)
                if len(out) == min(count, len(self._members)):
                    break
        return out


class PrefixIndex:
    """Per replica, the hashes of the chunk-aligned prefixes of its recent prompts (an LRU
    of ``capacity`` entries each): a prompt's match on a replica is how many of its
    leading chunks that replica has seen, times the chunk size, in characters."""

    def __init__(self, chunk_chars: int = 64, capacity: int = 50_000) -> None:
        if chunk_chars < 1 or capacity < 1:
            raise ValueError(f"chunk_chars={chunk_chars!r}, capacity={capacity!r}: must be >= 1")
        self.chunk_chars = chunk_chars
        self.capacity = capacity
        self._seen: Dict[str, "OrderedDict[int, None]"] = {}

    def _prefix_hashes(self, text: str) -> List[int]:
        # Each chunk's hash covers every chunk before it (a chain), so one lookup per chunk
        # tests the whole prefix; a last partial chunk is left out.
        out: List[int] = []
        h = 0
        for i in range(0, len(text) - self.chunk_chars + 1, self.chunk_chars):
            h = _hash(f"{h:x}|{text[i:i + self.chunk_chars]}")
            out.append(h)
        return out

    def retain(self, replicas: Iterable[str]) -> None:
        """Forgets replicas that are gone (their KV went with them)."""
        keep = set(replicas)
        for r in list(self._seen):
            if r not in keep:
                del self._seen[r]

    def insert(self, replica: str, text: str) -> None:
        seen = self._seen.setdefault(replica, OrderedDict())
        for h in self._prefix_hashes(text):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def matches(self, text: str, replicas: Sequence[str]) -> Dict[str, int]:
        """Characters of ``text``'s prefix each replica has seen (0 for none)."""
        hashes = self._prefix_hashes(text)
        out: Dict[str, int] = {}
        for r in replicas:
            seen = self._seen.get(r)
            n = 0
            if seen is not None:
                while n < len(hashes) and hashes[n] in seen:
                    n += 1
            out[r] = n * self.chunk_chars
        return out

    def size(self) -> int:
        """Entries held, all replicas together (the routing state's size)."""
        return sum(len(s) for s in self._seen.values())


@dataclass
class AffinityPolicy:
    """The routing policy (see the module's docstring); the router feeds it the replica
    set, asks :meth:`choose`, and reports where each request went (:meth:`routed`).

    Args:
        vnodes: ring points per replica.
        fallbacks: replicas tried after a session's own when it refuses the request (full).
        imbalance: a prefix match is given up when its replica's queue is longer than the
            shortest one by more than this many requests.
        min_match_chars: shorter prefix matches count as none.
        chunk_chars, capacity: the prefix index's chunk size and entries per replica.
    """

    vnodes: int = 100
    fallbacks: int = 1
    imbalance: int = 4
    min_match_chars: int = 64
    chunk_chars: int = 64
    capacity: int = 50_000
    ring: HashRing = field(init=False)
    index: PrefixIndex = field(init=False)

    def __post_init__(self) -> None:
        if self.fallbacks < 0 or self.imbalance < 0 or self.min_match_chars < 0:
            raise ValueError("AffinityPolicy: fallbacks, imbalance and min_match_chars must be >= 0")
        self.ring = HashRing(self.vnodes)
        self.index = PrefixIndex(self.chunk_chars, self.capacity)

    def update(self, replicas: Iterable[str]) -> None:
        replicas = list(replicas)
        self.ring.update(replicas)
        self.index.retain(replicas)

    def choose(self, key: RouteKey, candidates: Sequence[str], queue_lens: Mapping[str, int]) -> List[List[str]]:
        """Ranks of candidate replica ids, most preferred first; Serve takes the shortest
        queue within a rank that accepts. ``queue_lens``: requests each replica is known
        to hold (a replica missing from it counts as idle)."""
        if not candidates:
            return []
        if key.session is not None:
            ranked = [r for r in self.ring.ranked(key.session, 1 + self.fallbacks) if r in candidates]
            if ranked:
                return [[r] for r in ranked]
        if key.text:
            match = self.index.matches(key.text, candidates)
            best = max(match.values())
            if best >= max(self.min_match_chars, 1):
                shortest = min(queue_lens.get(r, 0) for r in candidates)
                holders = [r for r in candidates if match[r] == best
                           and queue_lens.get(r, 0) - shortest <= self.imbalance]
                if holders:
                    return [holders, list(candidates)]
        return [list(candidates)]

    def routed(self, key: RouteKey, replica: str) -> None:
        """Records that ``replica`` now holds ``key``'s prompt (its KV, for a while)."""
        if key.text:
            self.index.insert(replica, key.text)
