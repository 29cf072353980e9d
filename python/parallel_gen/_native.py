"""Loads the native extension after llama_cpp.

Order matters: llama_cpp loads its libllama first, and the extension's dependency on
``libllama.so.0`` then resolves to that same, already loaded library, so a
``llama_cpp.Llama`` and parallel_gen share one libllama (and one copy of the weights).
"""

import llama_cpp  # noqa: F401  (must precede _core)

from . import _core  # noqa: E402

__all__ = ["_core", "llama_cpp"]
