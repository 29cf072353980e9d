"""API keys: who may call the server, and each key's limits (``serve --api-keys FILE``).

The file is JSON::

    {"keys": [{"name": "alice", "key": "sk-...", "rpm": 60, "tpm": 20000, "max_concurrent": 8, "weight": 1},
              {"name": "bob", "sha256": "<hex of the key>"}]}

Only SHA-256 digests are kept in memory; a presented key is hashed and compared in
constant time, so neither the file (when it holds digests) nor the process holds secrets
that logs or metrics could leak: everything downstream sees the key's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

_FIELDS = ("name", "key", "sha256", "rpm", "tpm", "max_concurrent", "weight")
_NAME = re.compile(r"^[A-Za-z0-9._@:-]{1,64}$")  # safe as a metrics label and in a log line
_HEX = re.compile(r"^[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    """The SHA-256 hex digest a keys file may hold instead of the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key's identity and limits (None: unlimited)."""

    name: str
    digest: str
    """SHA-256 hex of the key itself."""
    rpm: Optional[int] = None
    """Requests per minute (a sliding 60-second window)."""
    tpm: Optional[int] = None
    """Prompt + completion tokens per minute (a sliding 60-second window)."""
    max_concurrent: Optional[int] = None
    """Sequences (prompts x n) admitted and not finished, queued or running."""
    weight: int = 1
    """Its share of the slots when several keys have sequences waiting."""


class KeyTable:
    """The keys a server accepts, looked up by the key a client presents."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys: List[ApiKey] = list(keys)
        if not self.keys:
            raise ValueError("no API keys: the table needs at least one")
        names = [k.name for k in self.keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"API key names must be unique: {', '.join(dup)} repeated")
        digests = [k.digest for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("two API key entries hold the same key")

    def find(self, presented: str) -> Optional[ApiKey]:
        """The key's entry, or None. Every entry is compared (in constant time each), so the
        time taken does not tell which entry, or how much of a digest, matched."""
        given = key_digest(presented).encode()
        found = None
        for k in self.keys:
            if hmac.compare_digest(given, k.digest.encode()):
                found = k
        return found

    @property
    def names(self) -> List[str]:
        return [k.name for k in self.keys]

    @classmethod
    def single(cls, key: str, name: str = "default") -> "KeyTable":
        """``--api-key KEY``: one key, no limits."""
        return cls([ApiKey(name, key_digest(key))])

    @classmethod
    def load(cls, path: str) -> "KeyTable":
        """Reads and checks a keys file; ValueError naming the file, entry and field."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(f"--api-keys {path}: cannot read it: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--api-keys {path}: not valid JSON: {e}") from None
        try:
            return cls.parse(data)
        except ValueError as e:
            raise ValueError(f"--api-keys {path}: {e}") from None

    @classmethod
    def parse(cls, data: Any) -> "KeyTable":
        if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], list):
            extra = sorted(set(data) - {"keys"}) if isinstance(data, dict) else []
            raise ValueError("expected {\"keys\": [...]}" + (f"; unknown fields: {', '.join(extra)}" if extra else ""))
        return cls(_entry(i, e) for i, e in enumerate(data["keys"]))


def _entry(i: int, e: Any) -> ApiKey:
    where = f"keys[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{where}: must be an object, got {type(e).__name__}")
    unknown = sorted(set(e) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown fields {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    name = e.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name={name!r}: required, 1-64 characters of letters, digits and ._@:-")
    where = f"{where} ({name})"
    if ("key" in e) == ("sha256" in e):
        raise ValueError(f"{where}: give exactly one of key and sha256")
    if "key" in e:
        if not isinstance(e["key"], str) or len(e["key"].strip()) < 8 or e["key"] != e["key"].strip():
            raise ValueError(f"{where}.key: must be a string of at least 8 characters, no surrounding spaces")
        digest = key_digest(e["key"])
    else:
        digest = e["sha256"].lower() if isinstance(e["sha256"], str) else ""
        if not _HEX.match(digest):
            raise ValueError(f"{where}.sha256: must be 64 hex digits (sha256sum of the key)")
    limits: Dict[str, Optional[int]] = {}
    for field in ("rpm", "tpm", "max_concurrent", "weight"):
        v = e.get(field)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{field}={v!r}: must be an integer >= 1 (or left out)")
        limits[field] = v
    return ApiKey(name, digest, rpm=limits.get("rpm"), tpm=limits.get("tpm"),
                  max_concurrent=limits.get("max_concurrent"), weight=limits.get("weight") or 1)
