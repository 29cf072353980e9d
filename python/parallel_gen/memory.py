"""KV cache memory: how many bytes a context takes, what the machine can spare, and
contexts sized to the work.

llama.cpp allocates every sequence's KV stream up front (n_ctx cells, rounded up to
256, for each of n_parallel sequences, plus one for a shared prefix), so n_ctx is what
decides a Model's memory, not the prompts it will see.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

logger = logging.getLogger("parallel_gen")

KV_MEMORY_SHARE = 0.5
"""The default n_ctx never makes the KV cache take more than this share of the memory
available when the Model opens."""
CELL_ROUND = 256
"""llama.cpp rounds each sequence's KV stream up to a multiple of 256 cells."""
MIN_DEFAULT_N_CTX = 512

# Bytes per 32 elements of each KV cache type (ggml block sizes).
_BYTES_PER_32: Dict[str, int] = {"f32": 128, "f16": 64, "bf16": 64, "q8_0": 34, "q5_1": 24, "q5_0": 22,
                                 "q4_1": 20, "q4_0": 18, "iq4_nl": 18}


def round_cells(n: int) -> int:
    return -(-n // CELL_ROUND) * CELL_ROUND


def _ints(value: Optional[str], n_layer: int, default: int) -> list:
    """A per-layer GGUF value: a number, or an array printed as "[a, b, ...]"."""
    if value is None or value == "":
        return [default] * n_layer
    parsed = json.loads(value)
    return [int(v) for v in parsed] if isinstance(parsed, list) else [int(parsed)] * n_layer


def kv_cell_bytes(metadata: Mapping[str, str], type_k: str, type_v: str) -> int:
    """Bytes of one KV cell (one token of one sequence) over all layers, from the GGUF's
    attention shape: per layer, K is n_head_kv x key_length elements and V n_head_kv x
    value_length, each stored as ``type_k`` / ``type_v``."""
    arch = metadata.get("general.architecture", "")
    n_layer = int(metadata[f"{arch}.block_count"])
    n_embd = int(metadata[f"{arch}.embedding_length"])
    n_head = _ints(metadata.get(f"{arch}.attention.head_count"), n_layer, 1)
    n_head_kv = _ints(metadata.get(f"{arch}.attention.head_count_kv"), n_layer, 0)
    n_head_kv = [kv or h for kv, h in zip(n_head_kv, n_head)]  # absent: no grouped-query attention
    head_k = int(metadata.get(f"{arch}.attention.key_length") or n_embd // max(1, n_head[0]))
    head_v = int(metadata.get(f"{arch}.attention.value_length") or head_k)
    total = 0
    for kv in n_head_kv:
        total += kv * head_k * _BYTES_PER_32[type_k] // 32 + kv * head_v * _BYTES_PER_32[type_v] // 32
    return total


def kv_cells(n_ctx: int, n_streams: int, kv_unified: bool, kv_size: Optional[int], n_parallel: int) -> int:
    """Cells llama.cpp allocates: one stream of n_ctx per sequence, or the unified pool."""
    if kv_unified:
        return round_cells(kv_size or n_ctx * n_parallel)
    return round_cells(n_ctx) * n_streams


def available_memory() -> Optional[int]:
    """Bytes this process could still take: MemAvailable, capped by a cgroup limit; None
    when the system does not say."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return max(0, min(found)) if found else None


def capped_default_n_ctx(wanted: int, cell_bytes: int, n_streams: int, available: Optional[int]) -> int:
    """``wanted`` (the default n_ctx), shrunk so the KV of ``n_streams`` sequences takes
    at most KV_MEMORY_SHARE of ``available`` bytes (never below MIN_DEFAULT_N_CTX)."""
    if available is None or cell_bytes <= 0:
        return wanted
    budget = int(available * KV_MEMORY_SHARE)
    fits = budget // (cell_bytes * n_streams) // CELL_ROUND * CELL_ROUND
    return wanted if fits >= wanted else max(min(MIN_DEFAULT_N_CTX, wanted), fits)


def n_ctx_for_work(longest_prompt: int, max_tokens: int, *, complete: bool, n_ctx_train: int) -> int:
    """Tokens per sequence for prompts of up to ``longest_prompt`` tokens and
    ``max_tokens`` of output, rounded up to 256. When the prompts seen are only a sample
    of the work (``complete=False``), room for prompts twice as long as the longest seen."""
    need = longest_prompt + max_tokens
    roomy = round_cells(2 * longest_prompt + max_tokens if not complete else need)
    if n_ctx_train > 0 and roomy > n_ctx_train:
        roomy = max(round_cells(need), min(roomy, n_ctx_train))
    return roomy


def n_ctx_for_prompts(prompts: Sequence[str], max_tokens: Iterable[int]) -> Callable[[Any], int]:
    """``n_ctx(model)`` for a call whose prompts are all known (``Model._sized``): the
    longest prompt in tokens plus the largest max_tokens, rounded up to 256."""
    def n_ctx(model: Any) -> int:
        longest = max((len(model.tokenize(p)) for p in prompts), default=0)
        return n_ctx_for_work(longest, max(max_tokens, default=1), complete=True, n_ctx_train=model.n_ctx_train)

    return n_ctx
