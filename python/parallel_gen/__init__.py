"""parallel_gen: unified-batch parallel text generation for llama.cpp (GGUF) models.

    import parallel_gen as pg
    results = pg.generate_parallel("model.gguf", prompts, max_tokens=128, temperature=0.7)
    answers = pg.chat_parallel(model, [[{"role": "user", "content": "Hi!"}]], max_tokens=64)
"""

import logging as _logging

from .cache import ResultCache
from .chat import apply_chat_template, chat_parallel
from .classify import Classification, Classifications, classify
from .errors import GenerationError, ModelLoadError
from .generate import generate_parallel
from .jobs import JobSummary, generate_iter, run_file_job
from .model import Model
from .models import default_model_path
from .params import SamplingParams
from .results import BatchResult, BatchStats, Completion, Logprob, Output, TokenLogprobs, ToolCall
from .runner import EngineStats
from .scoring import Score, score
from .stream import StreamEvent, astream_parallel, stream_parallel

__version__ = "0.1.0"
__all__ = [
    "BatchResult",
    "BatchStats",
    "Classification",
    "Classifications",
    "Completion",
    "EngineStats",
    "GenerationError",
    "JobSummary",
    "Logprob",
    "Model",
    "ModelLoadError",
    "Output",
    "ResultCache",
    "SamplingParams",
    "Score",
    "StreamEvent",
    "TokenLogprobs",
    "ToolCall",
    "apply_chat_template",
    "astream_parallel",
    "chat_parallel",
    "classify",
    "default_model_path",
    "generate_iter",
    "generate_parallel",
    "run_file_job",
    "score",
    "stream_parallel",
]

# Silent by default: a library leaves handlers to the application.
_logging.getLogger("parallel_gen").addHandler(_logging.NullHandler())
