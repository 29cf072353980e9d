"""Exceptions raised by parallel_gen."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from .results import Completion


class ModelLoadError(ValueError):
    """The file exists but llama.cpp cannot load it as a GGUF model, or cannot create a
    context for it with the requested settings."""


class GenerationError(RuntimeError):
    """llama.cpp failed fatally while decoding (an abort, or a compute or memory error).

    Every live sequence's KV cache was removed before this was raised, so the Model stays
    usable. ``results`` holds the completions that had finished before the failure, in
    prompt order; the prompts missing from it did not complete.
    """

    def __init__(self, message: str, results: "List[Completion]") -> None:
        super().__init__(message)
        self.results = results
