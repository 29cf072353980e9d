"""Model: a GGUF model plus the batch engine (a llama.cpp context with n_parallel slots)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from ._native import _core, llama_cpp
from .core.client import runner_of
from .config import KV_TYPES, ModelConfig, check_config_names, model_config
from .errors import Failure, ModelClosedError, ModelLoadError, ParamError, ParamTypeError
from .core.events import ERROR_CODES
from .memory import KV_MEMORY_SHARE, available_memory, capped_default_n_ctx, kv_cell_bytes, kv_cells
from .repack import check_borrowed, use_extra_bufts
from .core.runner import EngineRunner, EngineStats

if TYPE_CHECKING:
    from .params import SamplingParams

logger = logging.getLogger("parallel_gen")

PathLike = Union[str, "os.PathLike[str]"]

_KV_TYPE_NAMES = {v: k for k, v in KV_TYPES.items()}
DEFAULT_N_CTX = 4096
"""A Model opened without n_ctx gets min(training context, this), capped by memory."""
CHECKED_PARAMS_KEPT = 512
"""Distinct parameter sets (grammar, stop tokens, logit bias) whose check a Model remembers."""


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ParamTypeError(f"Model path must be a str or os.PathLike, got {type(path).__name__}", "path")
    return os.fspath(path)


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
        config: a :class:`~parallel_gen.ModelConfig` (default: ModelConfig()).
        **settings: ModelConfig fields applied on top of ``config``: ``n_parallel``,
            ``n_ctx``, ``n_batch``, ``n_threads``, ``n_gpu_layers``, ``kv_unified``,
            ``flash_attn``, ``type_k``, ``type_v``, ``kv_size``, ``share_prefix``,
            ``prompt_cache``, ``batch_invariant``, ``repack``, ``verbose`` (their meaning and
            defaults: ModelConfig's docstrings).

    Calls from any number of threads (generate, chat, streams) share the Model: each
    call's sequences join the one batch loop that runs on the Model's engine thread, as
    slots free and in turn with the other calls', and each call gets its own complete,
    unmixed results.
    """

    def __init__(self, path: PathLike, config: Optional[ModelConfig] = None, **settings: Any) -> None:
        path = _check_path(path)
        cfg = model_config(config, settings)
        handle, repacked = self._load(path, cfg)
        self._setup(path, handle, cfg, owner=None, repack=repacked)

    @staticmethod
    def _load(path: str, config: ModelConfig) -> "Tuple[_core.ModelHandle, bool]":
        """The weights, and whether they were loaded with extra buffer types."""
        _check_gguf(path)
        extra_bufts = use_extra_bufts(config.repack)
        try:
            return _core.ModelHandle.load(path, config.n_gpu_layers, extra_bufts, config.verbose), extra_bufts
        except RuntimeError as e:
            raise ModelLoadError(str(e)) from None

    @classmethod
    def open_sized(cls, path: PathLike, n_ctx: Callable[["Model"], int],
                   config: Optional[ModelConfig] = None) -> "Model":
        """Opens ``path`` with ``n_ctx(model)`` tokens per sequence, computed once the
        weights are loaded (so it can tokenize and render chat templates) and before any
        KV cache is allocated; ``config.n_ctx`` is ignored."""
        path = _check_path(path)
        cfg = (config or ModelConfig()).replace(n_ctx=None)
        self = cls.__new__(cls)
        self.path = path  # what n_ctx() may read: the path and the weights, no context yet
        self._handle, repacked = cls._load(path, cfg)
        self._token_texts = {}
        self._checked = OrderedDict()
        self._checked_lock = threading.Lock()
        sized = n_ctx(self)
        if isinstance(sized, bool) or not isinstance(sized, int) or sized < 8:
            raise ParamError(f"sized n_ctx={sized!r}: must be an int >= 8", "n_ctx")
        self._setup(path, self._handle, cfg.replace(n_ctx=sized), owner=None, repack=repacked)
        logger.info("n_ctx %d sized to the work: KV cache %.1f MiB for %d sequences", self.n_ctx,
                    self.kv_bytes / 2**20, self.n_parallel)
        return self

    @classmethod
    def from_llama(cls, llm: "llama_cpp.Llama", config: Optional[ModelConfig] = None, **settings: Any) -> "Model":
        """A Model over the weights an existing ``llama_cpp.Llama`` already holds.

        The weights are never loaded again; the Model gets its own context (KV cache) and
        keeps ``llm`` alive. Settings not given follow the Llama's own (n_batch, n_threads,
        flash_attn, type_k, type_v, verbose, n_gpu_layers), so outputs compare like with
        like against it; pass ``flash_attn="auto"`` for llama.cpp's automatic choice.

        Weight repacking is the Llama's: where llama.cpp was built with AMX kernels, a
        Llama loaded with extra buffer types (llama-cpp-python's default) is refused with
        a ValueError, as its first batched decode would crash; load it with
        :func:`parallel_gen.load_llama`, or pass ``repack=True`` to use it anyway. A
        ``repack`` given must match how the Llama was loaded.
        """
        if not isinstance(llm, llama_cpp.Llama):
            raise ParamTypeError(f"from_llama needs a llama_cpp.Llama, got {type(llm).__name__}", "llm")
        raw = getattr(getattr(llm, "_model", None), "model", None)
        if raw is None:
            raise ParamError("this llama_cpp.Llama has been closed: it holds no model", "llm")
        address = raw if isinstance(raw, int) else ctypes.cast(raw, ctypes.c_void_p).value
        check_config_names(settings)
        repacked = bool(llm.model_params.use_extra_bufts)
        check_borrowed(repacked, settings.get("repack", config.repack if config is not None else None))
        cp = llm.context_params
        n_parallel = settings.get("n_parallel", (config or ModelConfig()).n_parallel)
        its_own = dict(n_batch=max(llm.n_batch, n_parallel), n_threads=llm.n_threads,
                       flash_attn={-1: None, 0: False, 1: True}.get(int(cp.flash_attn_type)),
                       type_k=_KV_TYPE_NAMES.get(int(cp.type_k), "f16"), type_v=_KV_TYPE_NAMES.get(int(cp.type_v), "f16"),
                       verbose=bool(llm.verbose), n_gpu_layers=int(llm.model_params.n_gpu_layers))
        if config is not None:
            its_own = {}  # a whole config given: it says everything
        cfg = model_config(config, {**its_own, **settings, "repack": repacked})
        self = cls.__new__(cls)
        self._setup(getattr(llm, "model_path", "<llama_cpp.Llama>"), _core.ModelHandle.borrow(address), cfg,
                    owner=llm, repack=repacked)
        return self

    @classmethod
    def default(cls, config: Optional[ModelConfig] = None, **settings: Any) -> "Model":
        """Opens the default model (see :func:`parallel_gen.default_model_path`)."""
        from .model_files import default_model_path

        return cls(default_model_path(), config, **settings)

    def _setup(self, path: str, handle: "_core.ModelHandle", config: ModelConfig, owner: Any, repack: bool) -> None:
        self.path = path
        self._handle: Optional[_core.ModelHandle] = handle
        self._owner = owner  # a llama_cpp.Llama whose weights we borrow: keep it alive
        self._lock = threading.Lock()
        self._token_texts: Dict[int, str] = {}
        # Bounded (least recently used dropped): a long-running server sees endless
        # distinct grammars and logit biases.
        self._checked: "OrderedDict[Any, Optional[ParamError]]" = OrderedDict()
        self._checked_lock = threading.Lock()
        self._engine: Optional[_core.Engine] = None
        self._runner: Optional[EngineRunner] = None
        cell_bytes = kv_cell_bytes(handle.metadata(), config.type_k, config.type_v)
        n_ctx = config.n_ctx
        if n_ctx is None:
            wanted = max(8, min(handle.n_ctx_train, DEFAULT_N_CTX))
            n_ctx = wanted
            if not config.kv_unified:
                n_ctx = capped_default_n_ctx(wanted, cell_bytes, config.kv_streams, available_memory())
            if n_ctx < wanted:
                logger.warning("default n_ctx %d lowered to %d: %d sequences of %d tokens would need %.0f MiB of "
                               "KV cache, more than %.0f%% of the memory available; pass n_ctx (--n-ctx) to "
                               "choose", wanted, n_ctx, config.kv_streams, wanted,
                               kv_cells(wanted, config.kv_streams, False, None, 0) * cell_bytes / 2**20,
                               100 * KV_MEMORY_SHARE)
            if config.kv_size is not None and config.kv_size < n_ctx:
                raise ParamError(f"Model kv_size={config.kv_size} must be >= n_ctx={n_ctx}: one sequence must fit "
                                 "the pool", "kv_size")
            config = config.replace(n_ctx=n_ctx)
        elif n_ctx > handle.n_ctx_train > 0:
            logger.warning("n_ctx=%d is beyond the model's training context (%d): quality may drop past it",
                           n_ctx, handle.n_ctx_train)
        try:
            self._engine = _core.Engine(handle, config.to_native(n_ctx))
        except RuntimeError as e:
            raise ModelLoadError(str(e)) from None
        self.config: ModelConfig = config
        """The settings this Model runs with (n_ctx resolved)."""
        self.repack: bool = repack
        """Whether the weights were loaded with llama.cpp's extra buffer types (repacked)."""
        self.n_ctx: int = n_ctx
        self.n_batch: int = self._engine.n_batch
        self.kv_bytes: int = kv_cells(n_ctx, config.kv_streams, config.kv_unified, config.kv_size,
                                      config.n_parallel) * cell_bytes
        """Bytes of KV cache this Model's context allocated (all sequences, K and V)."""
        # The runner outlives a garbage-collected Model until its thread ends: it keeps
        # the borrowed Llama (and so the weights) alive that long.
        self._runner = EngineRunner(self._engine, config.n_parallel, keepalive=owner)

    # Settings, as attributes: the resolved ModelConfig is the source.
    n_parallel = property(lambda self: self.config.n_parallel)
    n_threads = property(lambda self: self.config.threads)
    n_gpu_layers = property(lambda self: self.config.n_gpu_layers)
    kv_unified = property(lambda self: self.config.kv_unified)
    kv_size = property(lambda self: self.config.kv_size)
    flash_attn = property(lambda self: self.config.flash_attn)
    type_k = property(lambda self: self.config.type_k)
    type_v = property(lambda self: self.config.type_v)
    share_prefix = property(lambda self: self.config.share_prefix)
    prompt_cache = property(lambda self: self.config.prompt_cache)
    batch_invariant = property(lambda self: self.config.batch_invariant)
    verbose = property(lambda self: self.config.verbose)

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
        sampling parameters (the result cache keys on it): ModelConfig.numerics(), the
        effective n_batch, llama.cpp's version and its backends. Not capacity: n_ctx,
        n_parallel and threads leave a completion as it is."""
        return dict(self.config.numerics(), n_batch=self.n_batch, repack=self.repack,
                    llama_cpp=getattr(llama_cpp, "__version__", "?"), backends=tuple(_core.backends()))

    @property
    def closed(self) -> bool:
        return self._runner is None

    @property
    def runner(self) -> Optional[EngineRunner]:
        """The engine thread's runner (None once closed); callers reach it through parallel_gen.core.client."""
        return self._runner

    @property
    def failure(self) -> Optional[str]:
        """Why this Model's engine thread failed (it is then broken); None while it works."""
        runner = self._runner
        return runner.failure if runner is not None else None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_parallel={self.n_parallel}, n_ctx={self.n_ctx}"
        return f"Model({os.path.basename(self.path)!r}, {state})"

    def _require_runner(self) -> EngineRunner:
        return runner_of(self)

    def _inject_abort(self, n_decodes: int) -> None:
        """Test hook: llama.cpp's abort callback fires in the n-th decode from now."""
        self._require_runner().run_on_engine(lambda e: e.abort_after_decodes(n_decodes))

    @property
    def handle(self) -> "_core.ModelHandle":
        """The loaded weights (native); raises once the Model is closed."""
        if self._handle is None:
            raise ModelClosedError("this Model is closed")
        return self._handle

    # -- model facts -----------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.handle.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.handle.n_ctx_train

    @property
    def description(self) -> str:
        return self.handle.description

    def metadata(self) -> Dict[str, str]:
        """The GGUF key/value metadata, values as strings."""
        return dict(self.handle.metadata())

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        """The model's chat template (Jinja text), or None when the GGUF has none."""
        return self.handle.chat_template(name or "") or None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> List[int]:
        """Token ids of ``text`` as generate_parallel tokenizes prompts."""
        return list(self.handle.tokenize(text.encode("utf-8"), add_special, parse_special))

    def detokenize(self, tokens: List[int], *, render_special: bool = False) -> str:
        return self.handle.detokenize(list(tokens), render_special).decode("utf-8", "replace")

    def check_tokens(self, tokens: List[int], continuations: Optional[List[List[int]]] = None) -> Optional[Failure]:
        """Why a prompt of ``tokens`` (with ``continuations`` to score after it) cannot run
        on this Model (empty, too long for n_ctx, ...): the engine's own rule, asked before
        submitting so a caller can refuse it at once. None when it can run."""
        item = _core.Item()
        item.tokens = tokens
        if continuations:
            params = _core.SamplingConfig()
            params.continuations = continuations
            item.params = params
        if self._engine is None:
            raise ModelClosedError("this Model is closed")
        found = self._engine.check(item)
        code = ERROR_CODES.get(found.code)
        return None if code is None else Failure(code, found.message)

    def check_params(self, params: "SamplingParams") -> Optional[ParamError]:
        """What only this model can tell is wrong with ``params`` (token ids outside its
        vocabulary, a grammar llama.cpp rejects), as a ParamError naming the field; None
        when nothing is. Remembered: the rows of a job mostly repeat their params."""
        key = (params.compiled_grammar, params.stop_token_ids, tuple(sorted((params.logit_bias or {}).items())),
               params.grammar is not None, params.json_schema is not None)
        with self._checked_lock:
            if key in self._checked:
                self._checked.move_to_end(key)
                return self._checked[key]
        problem = self._params_problem(params)  # outside the lock: a grammar check takes a while
        with self._checked_lock:
            self._checked[key] = problem
            while len(self._checked) > CHECKED_PARAMS_KEPT:
                self._checked.popitem(last=False)
        return problem

    def _params_problem(self, p: "SamplingParams") -> Optional[ParamError]:
        n_vocab = self.n_vocab
        for name, ids in (("stop_token_ids", p.stop_token_ids), ("logit_bias", sorted(p.logit_bias or ()))):
            bad = [t for t in ids if t >= n_vocab]
            if bad:
                return ParamError(f"SamplingParams.{name}: {bad} not in the model's vocabulary of {n_vocab} tokens",
                                  name)
        if p.compiled_grammar is not None:
            why = self.handle.grammar_error(p.compiled_grammar)
            if why:
                name = "grammar" if p.grammar is not None else "json_schema" if p.json_schema is not None else "choices"
                return ParamError(f"SamplingParams.{name}: llama.cpp rejects the grammar: {why}", name)
        return None

    def token_text(self, token: int) -> str:
        """One token's text, cached: logprobs name up to 20 alternatives per generated token."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.detokenize([token])
        return text
