"""generate(ds, model, ...): a Dataset of prompts in, the Dataset of output rows out."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import ray.data

from ..config import model_config
from ..jobs.generation_job import GenerationJob, job_params
from ..params import SamplingParams
from ..result_cache import ResultCache
from ..result_cache_redis import is_redis_url
from ..tools import tool_request
from .batch import BatchGenerator

ROWS_PER_SLOT = 4
"""Default batch size: this many rows per slot of the actor's Model, so every slot is
refilled a few times per batch (less idle time at a batch's tail) while a batch stays
small enough to be cheap to redo when its actor dies."""


def generate(ds: "ray.data.Dataset", model: Union[str, "os.PathLike[str]", None] = None, *,
             prompt_column: str = "prompt", messages_column: str = "messages", actors: int = 1,
             cpus_per_actor: float = 1, gpus_per_actor: float = 0, batch_size: Optional[int] = None,
             chat: bool = False, system: Optional[str] = None, chat_template: Optional[str] = None,
             params: Optional[SamplingParams] = None, model_options: Optional[Mapping[str, Any]] = None,
             cache: Union[None, str, "os.PathLike[str]", ResultCache] = None,
             tools: Optional[Sequence[Mapping[str, Any]]] = None, tool_choice: Any = None,
             parallel_tool_calls: bool = True, **sampling: Any) -> "ray.data.Dataset":
    """The rows of ``ds``, each with the output columns of a file job added (lazy, like
    every Dataset transform: it runs when the result is written or read).

    Args:
        ds: a Dataset with a ``prompt_column`` (str) or ``messages_column`` (a list of
            {"role", "content"}) column; other columns are carried unchanged.
        model: GGUF path readable at that path on every node (None: the default model,
            installed on each node with ``parallel-gen install-model``).
        actors: Ray actors, each holding one Model (a fixed pool).
        cpus_per_actor: CPUs Ray reserves per actor, and its llama.cpp threads.
        gpus_per_actor: GPUs per actor; an actor given one offloads every layer.
        batch_size: rows per batch handed to an actor (default: 4 per slot of its
            Model, ROWS_PER_SLOT x n_parallel). An actor whose process dies is restarted and its
            batch run again: no row is lost or written twice.
        chat, system, chat_template: plain prompts through the chat template.
        params, **sampling: the job's SamplingParams (fields as keywords override); a
            row's columns named like SamplingParams fields override them for that row.
            Without a seed the job picks one; each row samples with the job's seed plus
            a hash of its fields, the same on any actor or retry.
        model_options: other Model keywords (n_parallel, n_ctx, type_k, ...).
        cache: a result cache every actor opens: a ``redis://`` URL (shared by every
            node, and with servers and other jobs) or a directory each node can write
            (a ResultCache: its own). Rows whose result is a function of their inputs
            (greedy, or seeded by ``seed`` or a row's seed) are looked up there first
            and stored once decoded whole.
        tools, tool_choice, parallel_tool_calls: tools offered in every row's
            conversation, as for :func:`parallel_gen.run_file_job` (they imply chat, and
            add the ``content`` and ``tool_calls`` columns).

    Returns:
        The Dataset of output rows; see :class:`BatchGenerator` for the columns. Rows
        come back in any order unless ``ds.context.execution_options.preserve_order``
        is set: join on a column of your own (an id).

    Raises:
        TypeError, ValueError: bad arguments or sampling settings, at the call.
    """
    job = generation_job(params, chat=chat, system=system, chat_template=chat_template, tools=tools,
                         tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **sampling)
    return generate_job(ds, model, job, prompt_column=prompt_column, messages_column=messages_column,
                        actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                        batch_size=batch_size, model_options=model_options, cache=cache)


def generation_job(params: Optional[SamplingParams] = None, *, chat: bool = False, system: Optional[str] = None,
                   chat_template: Optional[str] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
                   tool_choice: Any = None, parallel_tool_calls: bool = True, **sampling: Any) -> GenerationJob:
    """The GenerationJob of :func:`generate`'s arguments: checked here, not in every actor;
    its seed drawn once for the whole job, before any actor starts."""
    return GenerationJob(job_params(params, sampling), chat=chat, system=system, chat_template=chat_template,
                         tools=tool_request(tools, tool_choice, parallel_tool_calls))


def generate_job(ds: "ray.data.Dataset", model: Union[str, "os.PathLike[str]", None], job: GenerationJob, *,
                 prompt_column: str = "prompt", messages_column: str = "messages", actors: int = 1,
                 cpus_per_actor: float = 1, gpus_per_actor: float = 0, batch_size: Optional[int] = None,
                 model_options: Optional[Mapping[str, Any]] = None,
                 cache: Union[None, str, "os.PathLike[str]", ResultCache] = None) -> "ray.data.Dataset":
    """:func:`generate` of a GenerationJob built by the caller (``run_ray_job``, which
    records the job's seed); its chat settings, tools and SamplingParams are the actors'."""
    for name, value in (("prompt_column", prompt_column), ("messages_column", messages_column)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}={value!r}: must be a non-empty str")
    options = dict(model_options or {})
    path = None if model is None else os.fspath(model)
    return map_with_actors(ds, BatchGenerator, (path,),
                           dict(params=job.params, prompt_column=prompt_column, messages_column=messages_column,
                                chat=job.chat, system=job.system, chat_template=job.chat_template,
                                model_options=options, cache=cache_location(cache), seed_given=job.seed_given,
                                tools=job.tools),
                           actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                           batch_size=batch_size, n_parallel=model_config(None, options).n_parallel)


def cache_location(cache: Union[None, str, "os.PathLike[str]", ResultCache]) -> Optional[str]:
    """Where every actor opens the result cache: a Redis URL, or a directory made absolute
    (an actor's working directory is not the driver's)."""
    if cache is None:
        return None
    if isinstance(cache, ResultCache):
        return cache.url or os.path.abspath(cache.path)
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a path, a redis:// URL or a parallel_gen.ResultCache, "
                        f"got {type(cache).__name__}")
    return os.fspath(cache) if is_redis_url(cache) else os.path.abspath(cache)


def map_with_actors(ds: "ray.data.Dataset", cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any], *,
                    actors: int, cpus_per_actor: float, gpus_per_actor: float, batch_size: Optional[int],
                    n_parallel: int) -> "ray.data.Dataset":
    """``ds.map_batches`` with a fixed pool of ``actors`` instances of ``cls(*args,
    **kwargs)``, one Model each; the pool's arguments checked first (ValueError)."""
    if not isinstance(ds, ray.data.Dataset):
        raise TypeError(f"ds must be a ray.data.Dataset, got {type(ds).__name__}")
    _check_count("actors", actors)
    if batch_size is not None:
        _check_count("batch_size", batch_size)
    for name, value in (("cpus_per_actor", cpus_per_actor), ("gpus_per_actor", gpus_per_actor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r}: must be a number >= 0")
    if cpus_per_actor < 1 and gpus_per_actor == 0:
        raise ValueError(f"cpus_per_actor={cpus_per_actor!r}: an actor without a GPU needs at least 1 CPU")
    return ds.map_batches(
        cls,
        fn_constructor_args=args,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=batch_size or ROWS_PER_SLOT * n_parallel,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        # Ray Data's actor pools restart a dead actor process and retry its task without
        # limit (max_restarts=-1, max_task_retries=-1 by default): the batch it held is
        # run again and only the finished copy is kept (test_ray kills one).
    )


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an int >= 1")
