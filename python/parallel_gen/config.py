"""ModelConfig: every setting of a Model and its engine, with its default, in one place.

``pg.Model(path, n_parallel=16)`` builds one from its keywords; the command line
(``--n-parallel``, ...), the server, Ray's ``model_options`` and R's ``pg_model()`` all
read the fields here, and :meth:`ModelConfig.numerics` says which of them can change a
prompt's output (the result cache keys on those).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .errors import ParamError, ParamTypeError

# KV cache element types llama.cpp accepts (ggml_type values).
KV_TYPES: Dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
_FLASH = {None: -1, False: 0, True: 1}
# Shorter shared prefixes are cheaper to recompute than to copy (a copy moves a whole KV
# stream when every sequence has its own).
MIN_SHARED_PREFIX = 16

# The fewest rows of a generation step in batch-invariant mode. On llama.cpp's CPU backend
# a one-token row's numbers stop depending on the step's row count from about 9 rows on
# (flash attention on; 8 with it off); 12 keeps the 4-row kernels whole. Measured in
# benchmarks/batch_invariant.py.
BATCH_INVARIANT_MIN_ROWS = 12


def cpu_threads() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _numerics() -> Dict[str, Any]:
    return {"numerics": True}


MAX_CACHE_RAM_MIB = 2**30
"""ModelConfig.cache_ram's upper bound (a petabyte: the budget is a byte count in C++)."""

@dataclass(frozen=True)
class ModelConfig:
    """How a Model runs: its slots, context, batch, threads and KV cache (validated on creation)."""

    n_parallel: int = 8
    """Sequences decoded together (slots), >= 1. More prompts wait and join as slots free."""

    n_ctx: Optional[int] = None
    """Tokens per sequence, prompt + output (>= 8). None: min(training context, 4096),
    lowered (with a warning) so the KV cache takes at most half of the memory available
    when the Model opens; calls that open a Model from a path size it to their work."""

    n_batch: int = field(default=512, metadata=_numerics())
    """Most tokens per llama_decode call (>= n_parallel). It decides how prompts are cut
    into chunks, which changes numerics slightly."""

    n_threads: Optional[int] = None
    """CPU threads. None: every core this process may use."""

    n_gpu_layers: int = field(default=0, metadata=_numerics())
    """Layers offloaded to the GPU (-1: all) when llama-cpp-python was built with a GPU backend."""

    kv_unified: bool = field(default=False, metadata=_numerics())
    """One KV buffer shared by all sequences. The default (False) gives each sequence its
    own stream, which keeps a prompt's greedy output identical to decoding it alone and is
    faster when prompts share little."""

    flash_attn: Optional[bool] = field(default=None, metadata=_numerics())
    """Flash attention: True, False, or None (also "auto") for llama.cpp's choice. It
    changes numerics: keep it the same when comparing outputs."""

    type_k: str = field(default="f16", metadata=_numerics())
    """KV cache element type of K ("f16", "q8_0", ...; see KV_TYPES)."""

    type_v: str = field(default="f16", metadata=_numerics())
    """KV cache element type of V (quantized V needs flash attention)."""

    kv_size: Optional[int] = field(default=None, metadata=_numerics())
    """With kv_unified only: cells of the shared KV pool (>= n_ctx; default n_ctx x
    n_parallel). When a smaller pool runs out, a shared prefix is given up first, then the
    youngest sequence is paused and recomputed later."""

    share_prefix: bool = field(default=True, metadata=_numerics())
    """Decode a prompt prefix (>= 16 tokens) shared by several waiting prompts, or by the
    n samples of one prompt, once, and copy its KV to each. Costs one more KV stream when
    kv_unified is False; cutting a prefill there changes numerics slightly."""

    prompt_cache: bool = field(default=True, metadata=_numerics())
    """Keep the KV of finished prompts (prompt and output) while the Model's KV has room,
    so a later prompt starting with the same tokens (a conversation's next turn, an
    agent's next step, a repeated instruction) decodes only what is new. Free streams
    keep their last sequence's KV; a full pool evicts the least recently used entry
    before any running sequence waits. Costs one more KV stream when kv_unified is False
    (shared with share_prefix). Per prompt: SamplingParams.cache_prompt. Numerics: a
    prefill resumed from a cached prefix is cut there, which changes outputs slightly
    (as share_prefix does)."""

    cache_ram: int = field(default=8192, metadata=_numerics())
    """MiB of host memory for the prompt cache's second tier (llama-server's --cache-ram;
    0: none). When a KV stream holding a cache entry is needed for another prompt, its
    tokens and KV state are saved to host memory first, and a later prompt whose longest
    cached prefix lives there is restored into a free stream instead of decoded: with more
    conversations than slots each keeps its KV between turns. Least recently used entries
    go first; an entry a longer one contains is not stored twice. Only with prompt_cache;
    the memory is taken as entries are saved, never beyond this."""

    batch_invariant: bool = field(default=False, metadata=_numerics())
    """A prompt's output (greedy tokens, logprobs, scores) is bit-identical whether it runs
    alone or among any companions, in any slot, arriving at any time (same machine, build,
    model and settings). Each prompt is prefilled in decode calls of its own and every
    generation step is padded to at least BATCH_INVARIANT_MIN_ROWS rows: slower when few
    sequences run or many prompts arrive at once. Needs kv_unified=False; turns
    share_prefix and prompt_cache off (a prefill cut where companions or earlier prompts
    share it would change numerics)."""

    backend_sampling: Optional[bool] = field(default=None, metadata=_numerics())
    """Sample in llama.cpp's graph (its backend sampling API) where a prompt's sampler chain
    has a backend form (greedy, top_k, top_p, min_p, temperature, seeded draw): only token
    ids come back from the device, no logits for the host to read and sample. Prompts with
    a grammar, logprobs, logit_bias or penalties sample on the host in the same batch. None
    (auto): on when layers are offloaded to a GPU (n_gpu_layers != 0 and a GPU build), off
    on a CPU, where it was measured slower (docs/performance.md). It changes numerics: a
    seeded draw takes other random numbers than the host's (reproducible per seed and
    setting); greedy picks the same token up to exact ties. Not with batch_invariant."""

    repack: Optional[bool] = None
    """Let llama.cpp repack the weights for its faster CPU kernels (its "extra buffer
    types"; False is llama.cpp's --no-repack). None: off when llama.cpp was built with AMX
    kernels, which crash on recent Intel Xeons (logged once), else on (see
    parallel_gen.repack). It changes numerics: Model.numerics() holds what was used."""

    verbose: bool = False
    """Let llama.cpp print its log to stderr."""

    def __post_init__(self) -> None:
        from ._native import _core  # on use: the CLI builds its options from the fields without loading llama.cpp
        from .repack import check_repack

        set_ = object.__setattr__  # frozen: normalise in place once
        _int("n_parallel", self.n_parallel, 1, int(_core.max_parallel_sequences()))
        if self.n_ctx is not None:
            _int("n_ctx", self.n_ctx, 8)
        _int("n_batch", self.n_batch, 1)
        if self.n_batch < self.n_parallel:
            raise ParamError(f"Model n_batch={self.n_batch} must be >= n_parallel={self.n_parallel}: every "
                             "generating sequence adds one token to each batch", "n_batch")
        if self.n_threads is not None:
            _int("n_threads", self.n_threads, 1)
        _int("n_gpu_layers", self.n_gpu_layers, -1)
        _int("cache_ram", self.cache_ram, 0, MAX_CACHE_RAM_MIB)
        for name in ("kv_unified", "share_prefix", "prompt_cache", "batch_invariant", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ParamTypeError(f"Model {name} must be a bool, got {getattr(self, name)!r}", name)
        check_repack(self.repack)
        if self.backend_sampling not in (None, True, False):
            raise ParamTypeError(f"Model backend_sampling must be True, False or None (auto), got "
                                 f"{self.backend_sampling!r}", "backend_sampling")
        if self.batch_invariant:
            if self.backend_sampling:
                raise ParamError("Model backend_sampling=True cannot go with batch_invariant=True: the invariant "
                                 "mode samples on the host", "backend_sampling")
            if self.kv_unified:
                raise ParamError("Model batch_invariant=True needs kv_unified=False: in a shared KV pool a "
                                 "sequence's attention depends on where its companions' cells are",
                                 "batch_invariant")
            if self.n_batch < BATCH_INVARIANT_MIN_ROWS:
                raise ParamError(f"Model n_batch={self.n_batch} must be >= {BATCH_INVARIANT_MIN_ROWS} with "
                                 "batch_invariant=True: a generation step is that many rows", "n_batch")
            set_(self, "share_prefix", False)
            set_(self, "prompt_cache", False)
        if not self.prompt_cache:
            set_(self, "cache_ram", 0)  # the host tier is the prompt cache's: nothing to keep
        if self.flash_attn == "auto":
            set_(self, "flash_attn", None)
        if self.flash_attn not in _FLASH:
            raise ParamError(f"Model flash_attn={self.flash_attn!r}: must be True, False or None (auto)",
                             "flash_attn")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise ParamError(f"Model {name}={getattr(self, name)!r}: must be one of {sorted(KV_TYPES)}", name)
        if self.kv_size is not None:
            if not self.kv_unified:
                raise ParamError("Model kv_size is only meaningful with kv_unified=True (a shared KV pool); "
                                 "without it every sequence has its own n_ctx stream", "kv_size")
            _int("kv_size", self.kv_size, 8)
            if self.n_ctx is not None and self.kv_size < self.n_ctx:
                raise ParamError(f"Model kv_size={self.kv_size} must be >= n_ctx={self.n_ctx}: one sequence must "
                                 "fit the pool", "kv_size")

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again); TypeError naming unknown ones."""
        check_config_names(changes)
        return dataclasses.replace(self, **changes)

    @property
    def threads(self) -> int:
        """n_threads, or every core this process may use."""
        return self.n_threads if self.n_threads is not None else cpu_threads()

    @property
    def samples_on_backend(self) -> bool:
        """backend_sampling with auto resolved: on where layers run on a GPU build."""
        if self.backend_sampling is not None:
            return self.backend_sampling
        if self.batch_invariant or self.n_gpu_layers == 0:
            return False
        from ._native import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())

    @property
    def kv_streams(self) -> int:
        """KV streams llama.cpp allocates with separate streams: one per slot, plus one for a
        shared prefix and the prompt cache below llama.cpp's sequence limit; in
        batch-invariant mode (neither) at least BATCH_INVARIANT_MIN_ROWS (padding rows each
        take an empty stream). The engine's rule (_core.kv_streams)."""
        from ._native import _core

        return int(_core.kv_streams(self.to_native(n_ctx=self.n_ctx or 8)))

    def numerics(self) -> Dict[str, Any]:
        """The settings that can change a prompt's output (not capacity: n_parallel, n_ctx,
        threads and verbosity leave a completion as it is)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("numerics")}

    def to_native(self, n_ctx: int) -> "_core.EngineConfig":
        """The engine's configuration, with the context size the Model settled on."""
        from ._native import _core

        ec = _core.EngineConfig()
        ec.n_parallel = self.n_parallel
        ec.n_ctx = n_ctx
        ec.n_batch = self.n_batch
        ec.n_threads = self.threads
        ec.kv_unified = self.kv_unified
        ec.flash_attn = _FLASH[self.flash_attn]
        ec.type_k = KV_TYPES[self.type_k]
        ec.type_v = KV_TYPES[self.type_v]
        ec.kv_size = self.kv_size or 0
        ec.min_prefix = MIN_SHARED_PREFIX if self.share_prefix else 2**31 - 1
        ec.prompt_cache = self.prompt_cache
        ec.cache_ram = self.cache_ram * 2**20
        ec.min_rows = BATCH_INVARIANT_MIN_ROWS if self.batch_invariant else 0
        ec.backend_sampling = self.samples_on_backend
        ec.verbose = self.verbose
        return ec


CONFIG_NAMES = frozenset(f.name for f in dataclasses.fields(ModelConfig))


def check_config_names(names: Any) -> None:
    """TypeError naming every key of ``names`` that is not a ModelConfig field."""
    unknown = sorted(set(names) - CONFIG_NAMES)
    if unknown:
        raise ParamTypeError(f"unknown Model setting(s): {', '.join(unknown)}; valid: {', '.join(sorted(CONFIG_NAMES))}",
                             unknown[0])


def model_config(config: Optional[ModelConfig] = None, settings: Optional[Mapping[str, Any]] = None) -> ModelConfig:
    """``config`` (default: ModelConfig()) with ``settings`` (ModelConfig field names) applied."""
    if config is not None and not isinstance(config, ModelConfig):
        raise ParamTypeError(f"config must be a ModelConfig, got {type(config).__name__}", "config")
    base = config or ModelConfig()
    return base.replace(**settings) if settings else base


def _int(name: str, value: Any, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamTypeError(f"Model {name} must be an int, got {type(value).__name__} {value!r}", name)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParamError(f"Model {name}={value!r}: must be {rng}", name)
