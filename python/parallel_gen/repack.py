"""Weight repacking (llama.cpp's extra buffer types) and the CPU build that decides it.

llama.cpp copies the weights of a CPU model into "extra buffer types" when it has faster
kernels for them: CPU_REPACK (interleaved layouts for AVX2/NEON matmuls) and, when the
CPU backend was compiled with AMX (Intel's matrix tiles, Sapphire Rapids and later),
AMX. The AMX kernels of the llama.cpp that llama-cpp-python 0.3.36 vendors crash on
recent Intel Xeons under Linux (tile permission and configuration under XFD: llama.cpp
pull request 26954), in llama.cpp's own tools too. Loading with
``llama_model_params.use_extra_bufts = false`` (llama.cpp's ``--no-repack``) keeps the
weights out of every extra buffer type and runs the plain CPU kernels, which work there.

The policy lives here, in :func:`choose_repack`: ``repack=None`` (auto) turns extra
buffer types off on a build with AMX kernels and keeps llama.cpp's default (on)
elsewhere; ``True``/``False`` are used as given.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ._native import _core, llama_cpp
from .errors import ParamTypeError

logger = logging.getLogger("parallel_gen")


@dataclass(frozen=True)
class CpuBuild:
    """What llama.cpp's CPU backend in this process was compiled with."""

    features: Mapping[str, str]
    """ggml's feature flags, as llama_print_system_info shows them: {"AVX2": "1", ...}."""
    extra_buffer_types: Tuple[str, ...]
    """The buffer types weights may be repacked into ("AMX", "CPU_REPACK", ...)."""
    amx_kernels: bool
    """The AMX matmul kernels are compiled in (AMX_INT8 = 1)."""


@functools.lru_cache(maxsize=None)
def cpu_build() -> CpuBuild:
    """This process's llama.cpp CPU backend (read once: it cannot change)."""
    info = _core.cpu_backend_info()
    return CpuBuild(features=dict(info.features), extra_buffer_types=tuple(info.extra_buffer_types),
                    amx_kernels=bool(info.amx_kernels))


@dataclass(frozen=True)
class RepackChoice:
    """Whether to load weights with extra buffer types, and why."""

    use_extra_bufts: bool
    reason: str


AMX_REASON = ("this llama.cpp build has AMX kernels (AMX_INT8 = 1), and those of the llama.cpp that "
              "llama-cpp-python 0.3.36 vendors crash on recent Intel Xeons (llama.cpp pull request 26954); with a "
              "llama.cpp that has the fix, repack=True (--repack) turns repacking on")


def check_repack(repack: Any) -> Optional[bool]:
    """Validates a ``repack`` setting: None (auto), True or False."""
    if repack is not None and not isinstance(repack, bool):
        raise ParamTypeError(f"Model repack must be True, False or None (auto), got {repack!r}", "repack")
    return repack


def choose_repack(repack: Optional[bool], build: CpuBuild) -> RepackChoice:
    """The policy: ``repack`` as given, or for None (auto) off on a build with AMX
    kernels and llama.cpp's default (on) elsewhere."""
    if repack is not None:
        return RepackChoice(repack, f"repack={repack} was asked for")
    if build.amx_kernels:
        return RepackChoice(False, AMX_REASON)
    return RepackChoice(True, "llama.cpp's default, this build has no AMX kernels")


def use_extra_bufts(repack: Optional[bool]) -> bool:
    """:func:`choose_repack` on this process's build; says why once when auto turns
    repacking off."""
    choice = choose_repack(check_repack(repack), cpu_build())
    if repack is None and not choice.use_extra_bufts:
        _log_once(f"weight repacking off: {choice.reason}")
    return choice.use_extra_bufts


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info("%s", message)


def check_borrowed(llama_uses_extra_bufts: bool, repack: Optional[bool], build: Optional[CpuBuild] = None) -> None:
    """Model.from_llama's check of a Llama whose weights are already loaded: ``repack``
    given must be how the Llama was loaded; None refuses a Llama with extra buffer types
    where the policy turns them off (an AMX build), before any decode can crash.
    ``build``: this process's (None) or another, to test the policy."""
    check_repack(repack)
    if repack is not None and repack != llama_uses_extra_bufts:
        how = "with" if llama_uses_extra_bufts else "without"
        raise ValueError(f"from_llama(repack={repack}): this llama_cpp.Llama was loaded {how} extra buffer types "
                         f"(weight repacking); load it with parallel_gen.load_llama(path, repack={repack}, ...)")
    choice = choose_repack(None, build or cpu_build())
    if repack is None and llama_uses_extra_bufts and not choice.use_extra_bufts:
        raise ValueError(f"this llama_cpp.Llama was loaded with extra buffer types (weight repacking), but "
                         f"{choice.reason}. Load it "
                         "with parallel_gen.load_llama(path, ...), which keeps them off, or pass repack=True to "
                         "use it as it is")


class RepackLlama(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` loaded with ``llama_model_params.use_extra_bufts`` chosen.

    llama-cpp-python's Llama has no argument for that field. Its constructor (0.3.36)
    fills ``self.model_params`` from llama_model_default_params() and then loads the
    model with that struct; this subclass sets the field as the attribute is assigned, so
    nothing global changes. Pickling (Ray) keeps the choice.
    """

    def __init__(self, model_path: str, *, use_extra_bufts: bool, **kwargs: Any) -> None:
        self._pg_use_extra_bufts = bool(use_extra_bufts)
        super().__init__(model_path, **kwargs)
        if "_pg_model_params" not in self.__dict__:  # a Llama that loads without self.model_params
            self.close()
            raise RuntimeError(f"llama-cpp-python {llama_cpp.__version__}'s Llama does not load through "
                               "self.model_params: parallel_gen cannot set use_extra_bufts for it")

    @property  # type: ignore[override]
    def model_params(self) -> Any:
        return self.__dict__["_pg_model_params"]

    @model_params.setter
    def model_params(self, params: Any) -> None:
        params.use_extra_bufts = self._pg_use_extra_bufts
        self.__dict__["_pg_model_params"] = params

    def __getstate__(self) -> Any:
        return {**super().__getstate__(), "use_extra_bufts": self._pg_use_extra_bufts}


def load_llama(model_path: str, *, repack: Optional[bool] = None, **kwargs: Any) -> "llama_cpp.Llama":
    """A ``llama_cpp.Llama(model_path, **kwargs)`` whose weights are repacked as a
    :class:`parallel_gen.Model` with the same ``repack`` would load them: with the
    default (auto), not on a build with AMX kernels, where the Llama would crash in its
    first batched decode. :meth:`parallel_gen.Model.from_llama` accepts it everywhere.

    Limits: ``Llama.from_pretrained`` and other constructors do not go through this;
    pickling keeps the choice (Ray).
    """
    return RepackLlama(model_path, use_extra_bufts=use_extra_bufts(repack), **kwargs)
