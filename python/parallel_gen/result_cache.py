"""An opt-in result cache for deterministic requests, on disk (diskcache).

A prompt's result is stored under a key made of the model's identity (a fingerprint of
the GGUF file's contents and every Model setting that changes numerics), the prompt, and
every sampling parameter. Only deterministic requests are cached: greedy ones, and those
with an explicit seed. A cache therefore never answers for other parameters or another
model file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import diskcache

from .result_cache_redis import CacheCounts, RedisStore, is_redis_url
from .results import Completion

if TYPE_CHECKING:
    from .model import Model
    from .params import SamplingParams

logger = logging.getLogger("parallel_gen")

_FORMAT = 1  # bump when the stored layout or the key recipe changes
_SAMPLES = 64  # evenly spread 64 KiB blocks hashed per model file
_BLOCK = 1 << 16


def model_fingerprint(path: str) -> str:
    """A content fingerprint of a model file: its size and 64 blocks spread over it.

    Cheaper than hashing gigabytes, yet any other model, fine-tune or re-quantization
    (different header, tensor data) changes it.
    """
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(_SAMPLES):
            f.seek(size * k // _SAMPLES)
            h.update(f.read(_BLOCK))
    return h.hexdigest()


class ResultCache:
    """Results of deterministic requests, keyed by model, prompt and parameters.

    ``path``: a directory for the diskcache database. A corrupted database is moved
    aside (renamed ``<path>.corrupt-<time>``) and a fresh one started; an unreadable entry
    counts as a miss.

    Or a Redis URL (``redis://host:6379/0``, ``rediss://``, ``unix://``): entries shared by
    every process using that Redis, kept ``ttl`` seconds (None: until Redis evicts them),
    with the last ``memory_entries`` also in this process (see :mod:`.cache_redis`). A
    Redis that is down or slow makes lookups misses, never errors.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], ttl: Optional[float] = None,
                 memory_entries: int = 1024) -> None:
        self._fingerprints: Dict[str, str] = {}
        self._remote: Optional["RedisStore"] = None
        if is_redis_url(path):
            self.path = Path()
            self.url: Optional[str] = str(path)
            self._remote = RedisStore(str(path), ttl=ttl, memory_entries=memory_entries)
            return
        if ttl is not None:
            raise ValueError("ResultCache ttl= is for a Redis cache; a directory cache keeps entries until removed")
        self.url = None
        self.path = Path(path)
        self._db = self._open()

    @property
    def counts(self) -> Optional["CacheCounts"]:
        """Lookups by level of a Redis cache (None for a directory cache)."""
        return self._remote.counts if self._remote is not None else None

    def _open(self) -> diskcache.Cache:
        try:
            db = diskcache.Cache(str(self.path))
            db.check()  # raises on a database SQLite cannot read
            return db
        except Exception as e:  # sqlite3.DatabaseError and friends
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            logger.warning("result cache %s is unreadable (%s): moved to %s, starting a new one", self.path, e, aside)
            os.replace(self.path, aside)
            return diskcache.Cache(str(self.path))

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
        else:
            self._db.close()

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._remote) if self._remote is not None else len(self._db)

    def key(self, model: "Model", prompt: str, params: "SamplingParams") -> str:
        fp = self._fingerprints.get(model.path)
        if fp is None:
            fp = self._fingerprints[model.path] = model_fingerprint(model.path)
        fields = dataclasses.asdict(params)
        if params.temperature == 0:
            fields.pop("seed")  # greedy: the seed changes nothing
        if isinstance(fields.get("json_schema"), str):
            fields["json_schema"] = json.loads(fields["json_schema"])
        if fields.get("logit_bias"):
            fields["logit_bias"] = sorted(fields["logit_bias"].items())
        payload = json.dumps({"format": _FORMAT, "model": fp, "settings": model.numerics(), "prompt": prompt,
                              "params": fields}, sort_keys=True, default=repr)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> Optional[Completion]:
        store = self._remote if self._remote is not None else self._db
        try:
            raw = store.get(key)
            return None if raw is None else Completion.from_dict(json.loads(raw))
        except Exception as e:  # a damaged entry: a miss, and drop it
            logger.warning("result cache %s: unreadable entry dropped (%s)", self.url or self.path, e)
            store.delete(key)
            return None

    def put(self, key: str, completion: Completion) -> None:
        raw = json.dumps(completion.to_dict())
        if self._remote is not None:
            self._remote.put(key, raw)
        else:
            self._db.set(key, raw)


def open_cache(cache: Union[None, str, "os.PathLike[str]", ResultCache]) -> Optional[ResultCache]:
    if cache is None or isinstance(cache, ResultCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return ResultCache(cache)
    raise TypeError(f"cache must be a path or a parallel_gen.ResultCache, got {type(cache).__name__}")

