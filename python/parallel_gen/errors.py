"""Exceptions raised by parallel_gen, and the codes that say why a prompt failed.

A prompt that cannot run is not an exception: its :class:`~parallel_gen.Output` has
``finish_reason == "error"``, a message for people in ``error`` and an
:class:`ErrorCode` in ``error_code`` for programs (the server maps codes to HTTP
statuses, file jobs write them in the ``error`` column's row). Exceptions are for the
whole call: bad arguments (:class:`ParamError`, a ``ValueError``), a model that cannot
load, and :class:`GenerationError` when the engine fails, the Model is closed, or the
call is cancelled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .results import Completion


class ErrorCode(str, enum.Enum):
    """Why one prompt (one output) failed. A ``str``, so it compares and serializes as its value."""

    EMPTY_PROMPT = "empty_prompt"
    """The prompt has no tokens."""
    PROMPT_TOO_LONG = "prompt_too_long"
    """The prompt (or prompt + a scored continuation) does not fit the sequence's n_ctx."""
    INVALID_PROMPT = "invalid_prompt"
    """The prompt is not valid Unicode text (or holds a token id outside the vocabulary)."""
    INVALID_PARAM = "invalid_param"
    """A parameter this model cannot honour: a grammar it rejects, a token id outside its vocabulary."""
    INVALID_INPUT = "invalid_input"
    """A file job's row that could not be read (malformed JSON, no prompt, a bad per-row setting)."""
    NO_KV_ROOM = "no_kv_room"
    """The sequence does not fit the KV cache even alone (a shared pool smaller than n_ctx)."""
    ABORTED = "aborted"
    """llama.cpp failed fatally while the prompt was running."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{code}" is the value on every Python version


@dataclass(frozen=True)
class Failure:
    """Why one prompt cannot run or did not finish: a code for programs, a message for people."""

    code: ErrorCode
    message: str


class ModelLoadError(ValueError):
    """The file exists but llama.cpp cannot load it as a GGUF model, or cannot create a
    context for it with the requested settings."""


class ParamError(ValueError):
    """An argument has a bad value; ``field`` names it (a SamplingParams or ModelConfig
    field, or an argument of the call)."""

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class ParamTypeError(TypeError):
    """An argument has the wrong type; ``field`` names it."""

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class GenerationError(RuntimeError):
    """A call could not finish: llama.cpp failed fatally while decoding (an abort, or a
    compute or memory error), the engine thread failed, the Model was closed, or the
    request was cancelled.

    Every live sequence's KV cache was removed before this was raised. ``results`` holds
    the completions that had finished before the failure, in prompt order; the prompts
    missing from it did not complete. ``code`` is :attr:`ErrorCode.ABORTED` for a decode
    failure, None for the subclasses.
    """

    code: Optional[ErrorCode] = ErrorCode.ABORTED

    def __init__(self, message: str, results: "Optional[List[Completion]]" = None) -> None:
        super().__init__(message)
        self.results: "List[Completion]" = list(results or [])


class ModelClosedError(GenerationError):
    """The Model was closed while the call was running (or before it started)."""

    code = None


class RequestCancelledError(GenerationError):
    """The request was cancelled by someone else while the call was waiting for it."""

    code = None


class EngineFailedError(GenerationError):
    """The engine thread itself failed (a bug, not a llama.cpp error): every waiting call
    gets this, and the Model is broken: close it and open a new one."""

    code = None
