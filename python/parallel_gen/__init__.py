"""parallel_gen: unified-batch parallel text generation for llama.cpp (GGUF) models.

    import parallel_gen as pg
    results = pg.generate_parallel("model.gguf", prompts, max_tokens=128, temperature=0.7)
"""

import logging as _logging

from .errors import GenerationError, ModelLoadError
from .generate import generate_parallel
from .model import Model
from .models import default_model_path
from .params import SamplingParams
from .results import BatchResult, BatchStats, Completion, Output

__version__ = "0.1.0"
__all__ = [
    "BatchResult",
    "BatchStats",
    "Completion",
    "GenerationError",
    "Model",
    "ModelLoadError",
    "Output",
    "SamplingParams",
    "default_model_path",
    "generate_parallel",
]

_logging.getLogger("parallel_gen").addHandler(_logging.NullHandler())
