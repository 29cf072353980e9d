"""Model: a GGUF model plus the batch engine (a llama.cpp context with n_parallel slots)."""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Union

from ._native import _core, llama_cpp
from .errors import ModelLoadError
from .memory import KV_MEMORY_SHARE, available_memory, capped_default_n_ctx, kv_cell_bytes, kv_cells
from .runner import EngineRunner, EngineStats

logger = logging.getLogger("parallel_gen")

PathLike = Union[str, "os.PathLike[str]"]

# KV cache element types llama.cpp accepts (ggml_type values).
KV_TYPES: Dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
_KV_TYPE_NAMES = {v: k for k, v in KV_TYPES.items()}
_FLASH = {None: -1, "auto": -1, False: 0, True: 1}
_DEFAULT_N_CTX = 4096
# Shorter shared prefixes are cheaper to recompute than to copy (a copy moves a whole KV
# stream when every sequence has its own).
_MIN_SHARED_PREFIX = 16


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Model {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Model {name}={value!r}: must be {rng}")
    return value


def _kv_type(name: str, value: Any) -> int:
    if value not in KV_TYPES:
        raise ValueError(f"Model {name}={value!r}: must be one of {sorted(KV_TYPES)}")
    return KV_TYPES[value]


def _flash(value: Any) -> int:
    if value not in _FLASH:
        raise ValueError(f"Model flash_attn={value!r}: must be True, False or None (auto)")
    return _FLASH[value]


def _check_gguf(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(2, "model file not found", path)
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a directory, not a GGUF model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path!r} is not a GGUF model file (it starts with {magic!r}, not b'GGUF')")


class Model:
    """A GGUF model ready for batched generation.

    ``n_parallel`` sequences run at once, each with its own KV stream of ``n_ctx`` tokens
    (prompt + output). More prompts than slots wait and are admitted as slots free.

    Args:
        path: the .gguf file.
        n_parallel: sequences decoded together (slots), >= 1.
        n_ctx: tokens per sequence, prompt + output. None: min(training context, 4096),
            shrunk (with a log line) so the KV cache takes at most half of the memory
            available when the Model opens (see ``kv_bytes``).
        n_batch: most tokens per llama_decode call (>= n_parallel).
        n_threads: CPU threads. None: every core this process may use.
        n_gpu_layers: layers offloaded to the GPU (-1: all) when llama-cpp-python was
            built with a GPU backend.
        kv_unified: one KV buffer shared by all sequences. The default (False) gives each
            sequence its own stream, which keeps a prompt's greedy output identical to
            decoding it alone and is faster when prompts share little.
        flash_attn: True, False, or None for llama.cpp's automatic choice. It changes the
            numerics: keep it the same when comparing outputs.
        type_k, type_v: KV cache element types ("f16", "q8_0", ...).
        kv_size: with kv_unified=True only, the cells of the shared KV pool (>= n_ctx;
            default n_ctx * n_parallel). A smaller pool is shared on demand: when it runs
            out, a shared prefix kept for waiting prompts is given up first, then the
            youngest sequence is paused and recomputed later.
        share_prefix: decode a prompt prefix (>= 16 tokens) shared by several waiting
            prompts, or by the n samples of one prompt, once, and copy its KV to each.
            Costs one more KV stream when kv_unified=False (shared with prompt_cache).
        prompt_cache: keep the KV of finished prompts (prompt and output) while the Model's
            KV has room, so a later prompt starting with the same tokens (a conversation's
            next turn, an agent's next step, a repeated instruction) decodes only what is
            new. Free streams keep their last sequence's KV; a full pool evicts the least
            recently used entry before any running sequence waits. Costs one more KV stream
            when kv_unified=False (shared with share_prefix). Per prompt:
            ``SamplingParams.cache_prompt``.
        verbose: let llama.cpp print its log to stderr.

    Calls from any number of threads (generate, chat, streams) share the Model: each
    call's sequences join the one batch loop that runs on the Model's engine thread, as
    slots free and in turn with the other calls', and each call gets its own complete,
    unmixed results.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        n_parallel: int = 8,
        n_ctx: Optional[int] = None,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        kv_unified: bool = False,
        flash_attn: Optional[bool] = None,
        type_k: str = "f16",
        type_v: str = "f16",
        kv_size: Optional[int] = None,
        share_prefix: bool = True,
        prompt_cache: bool = True,
        verbose: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Model path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        _check_int("n_gpu_layers", n_gpu_layers, -1)
        config = self._config(n_parallel, n_ctx, n_batch, n_threads, kv_unified, flash_attn, type_k, type_v,
                              kv_size, share_prefix, prompt_cache, verbose)
        self._setup(path, self._load(path, n_gpu_layers, verbose), config, owner=None, n_gpu_layers=n_gpu_layers)

    @staticmethod
    def _load(path: str, n_gpu_layers: int, verbose: bool) -> "_core.ModelHandle":
        _check_gguf(path)
        try:
            return _core.ModelHandle.load(path, n_gpu_layers, bool(verbose))
        except RuntimeError as e:
            raise ModelLoadError(str(e)) from None

    @classmethod
    def _sized(cls, path: PathLike, n_ctx: Callable[["Model"], int], *, n_gpu_layers: int = 0,
               **kwargs: Any) -> "Model":
        """Opens ``path`` with ``n_ctx(model)`` tokens per sequence, computed once the
        weights are loaded (so it can tokenize and render chat templates) and before any
        KV cache is allocated. ``kwargs``: the other Model settings."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Model path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.fspath(path)
        _check_int("n_gpu_layers", n_gpu_layers, -1)
        # The constructor's defaults for every setting not given.
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.kind is p.KEYWORD_ONLY and k != "n_gpu_layers"}
        config = cls._config(**{**defaults, **kwargs, "n_ctx": None})
        self = cls.__new__(cls)
        self.path = path  # what n_ctx() may read: the path and the weights, no context yet
        self._handle = cls._load(path, n_gpu_layers, config["verbose"])
        config["n_ctx"] = _check_int("n_ctx", n_ctx(self), 8)
        self._setup(path, self._handle, config, owner=None, n_gpu_layers=n_gpu_layers)
        logger.info("n_ctx %d sized to the work: KV cache %.1f MiB for %d sequences", self.n_ctx,
                    self.kv_bytes / 2**20, self.n_parallel)
        return self

    @classmethod
    def from_llama(
        cls,
        llm: "llama_cpp.Llama",
        *,
        n_parallel: int = 8,
        n_ctx: Optional[int] = None,
        n_batch: Optional[int] = None,
        n_threads: Optional[int] = None,
        kv_unified: bool = False,
        flash_attn: Union[bool, str, None] = None,
        type_k: Optional[str] = None,
        type_v: Optional[str] = None,
        kv_size: Optional[int] = None,
        share_prefix: bool = True,
        prompt_cache: bool = True,
        verbose: Optional[bool] = None,
    ) -> "Model":
        """A Model over the weights an existing ``llama_cpp.Llama`` already holds.

        The weights are never loaded again; the Model gets its own context (KV cache) and
        keeps ``llm`` alive. Settings left as None follow the Llama's own (n_batch,
        n_threads, flash_attn, type_k, type_v, verbose), so outputs compare like with like
        against it; pass ``flash_attn="auto"`` for llama.cpp's automatic choice.
        """
        if not isinstance(llm, llama_cpp.Llama):
            raise TypeError(f"from_llama needs a llama_cpp.Llama, got {type(llm).__name__}")
        raw = getattr(getattr(llm, "_model", None), "model", None)
        if raw is None:
            raise ValueError("this llama_cpp.Llama has been closed: it holds no model")
        address = raw if isinstance(raw, int) else ctypes.cast(raw, ctypes.c_void_p).value
        cp = llm.context_params
        config = cls._config(
            n_parallel,
            n_ctx,
            max(llm.n_batch, n_parallel) if n_batch is None else n_batch,
            llm.n_threads if n_threads is None else n_threads,
            kv_unified,
            {-1: None, 0: False, 1: True}.get(int(cp.flash_attn_type)) if flash_attn is None else flash_attn,
            _KV_TYPE_NAMES.get(int(cp.type_k), "f16") if type_k is None else type_k,
            _KV_TYPE_NAMES.get(int(cp.type_v), "f16") if type_v is None else type_v,
            kv_size,
            share_prefix,
            prompt_cache,
            bool(llm.verbose) if verbose is None else verbose,
        )
        self = cls.__new__(cls)
        self._setup(getattr(llm, "model_path", "<llama_cpp.Llama>"), _core.ModelHandle.borrow(address), config,
                    owner=llm, n_gpu_layers=int(llm.model_params.n_gpu_layers))
        return self

    @classmethod
    def default(cls, **kwargs: Any) -> "Model":
        """Opens the default model (see :func:`parallel_gen.default_model_path`)."""
        from .models import default_model_path

        return cls(default_model_path(), **kwargs)

    @staticmethod
    def _config(n_parallel: Any, n_ctx: Any, n_batch: Any, n_threads: Any, kv_unified: Any, flash_attn: Any,
                type_k: Any, type_v: Any, kv_size: Any, share_prefix: Any, prompt_cache: Any,
                verbose: Any) -> Dict[str, Any]:
        """Checks every setting before any loading is done."""
        _check_int("n_parallel", n_parallel, 1, int(_core.max_parallel_sequences()))
        if n_ctx is not None:
            _check_int("n_ctx", n_ctx, 8)
        _check_int("n_batch", n_batch, 1)
        if n_batch < n_parallel:
            raise ValueError(f"Model n_batch={n_batch} must be >= n_parallel={n_parallel}: every generating "
                             "sequence adds one token to each batch")
        if n_threads is not None:
            _check_int("n_threads", n_threads, 1)
        if not isinstance(kv_unified, bool):
            raise TypeError(f"Model kv_unified must be a bool, got {kv_unified!r}")
        if kv_size is not None:
            if not kv_unified:
                raise ValueError("Model kv_size is only meaningful with kv_unified=True (a shared KV pool); "
                                 "without it every sequence has its own n_ctx stream")
            _check_int("kv_size", kv_size, 8)
        if not isinstance(verbose, bool):
            raise TypeError(f"Model verbose must be a bool, got {verbose!r}")
        for name, value in (("share_prefix", share_prefix), ("prompt_cache", prompt_cache)):
            if not isinstance(value, bool):
                raise TypeError(f"Model {name} must be a bool, got {value!r}")
        return dict(n_parallel=n_parallel, n_ctx=n_ctx, n_batch=n_batch,
                    n_threads=_cpu_threads() if n_threads is None else n_threads, kv_unified=kv_unified,
                    flash_attn=_flash(flash_attn), type_k=_kv_type("type_k", type_k),
                    type_v=_kv_type("type_v", type_v), kv_size=kv_size, share_prefix=share_prefix,
                    prompt_cache=prompt_cache, verbose=verbose)

    def _setup(self, path: str, handle: "_core.ModelHandle", config: Dict[str, Any], owner: Any,
               n_gpu_layers: int) -> None:
        self.path = path
        self._handle: Optional[_core.ModelHandle] = handle
        self._owner = owner  # a llama_cpp.Llama whose weights we borrow: keep it alive
        self._lock = threading.Lock()
        self._token_texts: Dict[int, str] = {}
        self._engine: Optional[_core.Engine] = None
        self._runner: Optional[EngineRunner] = None
        n_ctx = config["n_ctx"]
        cell_bytes = kv_cell_bytes(handle.metadata(), _KV_TYPE_NAMES[config["type_k"]],
                                   _KV_TYPE_NAMES[config["type_v"]])
        n_streams = config["n_parallel"] + (1 if config["share_prefix"] or config["prompt_cache"] else 0)
        if n_ctx is None:
            wanted = max(8, min(handle.n_ctx_train, _DEFAULT_N_CTX))
            n_ctx = wanted
            if not config["kv_unified"]:
                n_ctx = capped_default_n_ctx(wanted, cell_bytes, n_streams, available_memory())
            if n_ctx < wanted:
                logger.warning("default n_ctx %d lowered to %d: %d sequences of %d tokens would need %.0f MiB of "
                               "KV cache, more than %.0f%% of the memory available; pass n_ctx (--n-ctx) to "
                               "choose", wanted, n_ctx, n_streams, wanted,
                               kv_cells(wanted, n_streams, False, None, 0) * cell_bytes / 2**20,
                               100 * KV_MEMORY_SHARE)
        elif n_ctx > handle.n_ctx_train > 0:
            logger.warning("n_ctx=%d is beyond the model's training context (%d): quality may drop past it",
                           n_ctx, handle.n_ctx_train)
        kv_size = config["kv_size"]
        if kv_size is not None and kv_size < n_ctx:
            raise ValueError(f"Model kv_size={kv_size} must be >= n_ctx={n_ctx}: one sequence must fit the pool")
        ec = _core.EngineConfig()
        ec.n_parallel = config["n_parallel"]
        ec.n_ctx = n_ctx
        ec.n_batch = config["n_batch"]
        ec.n_threads = config["n_threads"]
        ec.kv_unified = config["kv_unified"]
        ec.flash_attn = config["flash_attn"]
        ec.type_k = config["type_k"]
        ec.type_v = config["type_v"]
        ec.kv_size = kv_size or 0
        ec.min_prefix = _MIN_SHARED_PREFIX if config["share_prefix"] else 2**31 - 1
        ec.prompt_cache = config["prompt_cache"]
        ec.verbose = config["verbose"]
        try:
            self._engine = _core.Engine(handle, ec)
        except RuntimeError as e:
            raise ModelLoadError(str(e)) from None
        self.n_parallel: int = ec.n_parallel
        self.n_ctx: int = n_ctx
        self.n_batch: int = self._engine.n_batch
        self.n_threads: int = ec.n_threads
        self.kv_unified: bool = ec.kv_unified
        self.share_prefix: bool = config["share_prefix"]
        self.prompt_cache: bool = config["prompt_cache"]
        self.flash_attn: Optional[bool] = {-1: None, 0: False, 1: True}[ec.flash_attn]
        self.verbose: bool = ec.verbose
        self.type_k: str = _KV_TYPE_NAMES[ec.type_k]
        self.type_v: str = _KV_TYPE_NAMES[ec.type_v]
        self.kv_size: Optional[int] = kv_size
        self.n_gpu_layers: int = n_gpu_layers
        self.kv_bytes: int = kv_cells(n_ctx, n_streams, ec.kv_unified, kv_size, ec.n_parallel) * cell_bytes
        """Bytes of KV cache this Model's context allocated (all sequences, K and V)."""
        # The runner outlives a garbage-collected Model until its thread ends: it keeps
        # the borrowed Llama (and so the weights) alive that long.
        self._runner = EngineRunner(self._engine, ec.n_parallel, keepalive=owner)

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Stops the engine thread (calls still running raise GenerationError), frees the
        context and, unless borrowed from a Llama, the weights. Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._runner is not None:
                self._runner.stop()
            self._runner = None
            self._engine = None
            self._handle = None
            self._owner = None

    def __del__(self) -> None:
        # Garbage collection may run on any thread, the engine's included, and inside any
        # lock: stop the engine thread without waiting for it; it frees the context as it ends.
        runner = getattr(self, "_runner", None)
        if runner is not None:
            try:
                runner.stop_soon()
            except Exception:  # interpreter shutdown: nothing sensible left to do
                pass

    def stats(self) -> EngineStats:
        """What the engine is doing now: active requests, queued prompts, busy slots,
        tokens generated since the Model was opened, uptime."""
        return self._require_runner().stats()

    def numerics(self) -> Dict[str, Any]:
        """Every setting that can change this Model's outputs for the same prompt and
        sampling parameters (the result cache keys on it)."""
        return dict(n_ctx=self.n_ctx, n_batch=self.n_batch, kv_unified=self.kv_unified, kv_size=self.kv_size,
                    flash_attn=self.flash_attn, type_k=self.type_k, type_v=self.type_v,
                    n_gpu_layers=self.n_gpu_layers, share_prefix=self.share_prefix, prompt_cache=self.prompt_cache,
                    llama_cpp=getattr(llama_cpp, "__version__", "?"), backends=tuple(_core.backends()))

    @property
    def closed(self) -> bool:
        return self._runner is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_parallel={self.n_parallel}, n_ctx={self.n_ctx}"
        return f"Model({os.path.basename(self.path)!r}, {state})"

    def _require_runner(self) -> EngineRunner:
        runner = self._runner
        if runner is None:
            raise RuntimeError("this Model is closed")
        return runner

    def _inject_abort(self, n_decodes: int) -> None:
        """Test hook: llama.cpp's abort callback fires in the n-th decode from now."""
        self._require_runner().run_on_engine(lambda e: e.abort_after_decodes(n_decodes))

    @property
    def _model(self) -> "_core.ModelHandle":
        if self._handle is None:
            raise RuntimeError("this Model is closed")
        return self._handle

    # -- model facts -----------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._model.n_ctx_train

    @property
    def description(self) -> str:
        return self._model.description

    def metadata(self) -> Dict[str, str]:
        """The GGUF key/value metadata, values as strings."""
        return dict(self._model.metadata())

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        """The model's chat template (Jinja text), or None when the GGUF has none."""
        return self._model.chat_template(name or "") or None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Token ids of ``text`` as generate_parallel tokenizes prompts."""
        return list(self._model.tokenize(text.encode("utf-8"), add_special, parse_special))

    def detokenize(self, tokens: List[int], *, render_special: bool = False) -> str:
        return self._model.detokenize(list(tokens), render_special).decode("utf-8", "replace")

    def _token_text(self, token: int) -> str:
        """One token's text, cached: logprobs name up to 20 alternatives per generated token."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.detokenize([token])
        return text
