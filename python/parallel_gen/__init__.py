"""parallel_gen: unified-batch parallel text generation for llama.cpp (GGUF) models.

    import parallel_gen as pg
    results = pg.generate_parallel("model.gguf", prompts, max_tokens=128, temperature=0.7)
    answers = pg.chat_parallel(model, [[{"role": "user", "content": "Hi!"}]], max_tokens=64)

The names below are imported on first use: importing a submodule (the command line's
options, ``parallel-gen --help``) loads no llama.cpp.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

__version__ = "0.1.0"

# Each public name and the submodule that defines it.
_EXPORTS = {
    "Agreement": "study.agreement",
    "BatchResult": "results",
    "BatchStats": "results",
    "Classification": "classification",
    "Classifications": "classification",
    "Comparison": "study.compare",
    "Completion": "results",
    "EngineFailedError": "errors",
    "EngineStats": "core.runner",
    "ErrorCode": "errors",
    "GenerationError": "errors",
    "JobSummary": "jobs",
    "Logprob": "results",
    "Model": "model",
    "ModelClosedError": "errors",
    "ModelConfig": "config",
    "ModelLoadError": "errors",
    "Output": "results",
    "ParamError": "errors",
    "ParamTypeError": "errors",
    "RequestCancelledError": "errors",
    "ResultCache": "result_cache",
    "RunRecord": "study.record",
    "SamplingParams": "params",
    "Score": "scoring",
    "StreamEvent": "stream",
    "TokenLogprobs": "results",
    "ToolCall": "results",
    "agreement": "study.agreement",
    "apply_chat_template": "chat",
    "astream_parallel": "stream",
    "chat_parallel": "chat",
    "classify": "classification",
    "compare": "study.compare",
    "default_model_path": "model_files",
    "generate_iter": "iterate",
    "generate_parallel": "generate",
    "load_llama": "repack",
    "run_file_job": "jobs",
    "score": "scoring",
    "stream_parallel": "stream",
}
__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """The package module: a public name is imported from its submodule on first use."""

    _import = staticmethod(importlib.import_module)

    def __getattr__(self, name: str) -> object:
        module = _EXPORTS.get(name)
        if module is None:  # a submodule not imported yet (pg.jobs), else no such name
            try:
                return self._import(f"{__name__}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(self._import(f".{module}", __name__), name)
        super().__setattr__(name, value)
        return value

    def __dir__(self) -> "list[str]":
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Package

# Silent by default: a library leaves handlers to the application.
logging.getLogger("parallel_gen").addHandler(logging.NullHandler())

del importlib, logging, sys, types  # not names of the package
